-- =====================================================================================
-- pgflow engine, migration 0003: definitions the engine can run.
--
-- pgflow 0.8.1 accepted definitions that broke later, at run time:
--
--   * Flow slugs that differ only in case ("Twin", "twin"). pgmq lowercases the names
--     of its tables, so both flows used pgmq.q_twin: replacing one purged the other's
--     messages, and each served the other's. create_flow now refuses a new flow whose
--     slug equals an existing flow's but for case.
--   * Flow slugs of 48 to 128 characters (is_valid_slug allows 128): pgmq refuses queue
--     names of more than 47, after the flow row was written. create_flow now says so
--     first.
--   * Option values that overflow the engine's integer arithmetic: a timeout of
--     2147483646 made every read of its flow's queue fail (the message is hidden for
--     timeout + 2 seconds, an integer), and calculate_retry_delay failed once
--     base_delay * 2^attempts passed 2^31 - 1, and with it fail_task. create_flow and
--     add_step now refuse values above the bounds that pgflow-core states
--     (pgflow-core/src/options.rs, the MAX_* constants of StepOptions; the Rust builder and
--     #[step] check the same); the lower bounds stay the tables' check constraints. The
--     tables are 0.8.1's and get no new constraint: rows written before this migration
--     keep their values, which calculate_retry_delay, capped, can no longer overflow on.
--
-- Every refusal comes before anything is written, with the offending value and the rule.
-- Same signatures, return types and results otherwise. No row locks beyond 0001's order:
-- create_flow's advisory lock is taken before any.
-- =====================================================================================

-- floor(base_delay * 2^attempts_count), as in 0.8.1, but never out of integer's range:
-- a delay that would not fit is the largest (or, for a negative base, smallest) integer,
-- 68 years. Whether it fits is told by the logarithm with a margin of a factor of two
-- (> 32 rather than >= 31), which no rounding of log() comes near; below that margin the
-- product is computed exactly, as before, and clamped, and it is small enough that the
-- power cannot overflow numeric either (2^attempts_count for a huge attempts_count would).
CREATE OR REPLACE FUNCTION pgflow.calculate_retry_delay(base_delay numeric, attempts_count integer)
RETURNS integer
LANGUAGE sql
IMMUTABLE
SET search_path = ''
AS $$
  SELECT CASE
           WHEN base_delay IS NULL OR attempts_count IS NULL THEN NULL
           WHEN base_delay = 0 THEN 0
           WHEN attempts_count + log(2, abs(base_delay)) > 32 THEN
             CASE WHEN base_delay > 0 THEN 2147483647 ELSE -2147483648 END
           ELSE greatest(least(floor(base_delay * power(2::numeric, attempts_count)),
                               2147483647),
                         -2147483648)::integer
         END
$$;

-- Refuses option values above their bounds, naming p_subject (the flow or step) in the
-- message. NULL is a value not given. The bounds are those of pgflow-core's options.rs.
CREATE FUNCTION pgflow._check_option_bounds(
  p_subject      text,
  p_max_attempts integer,
  p_base_delay   integer,
  p_timeout      integer,
  p_start_delay  integer
)
RETURNS void
LANGUAGE plpgsql
IMMUTABLE
SET search_path = ''
AS $$
DECLARE
  v_option record;
BEGIN
  FOR v_option IN
    SELECT o.name, o.value, o.max, o.unit
      FROM (VALUES ('max_attempts', p_max_attempts, 100,      'attempts'),
                   ('base_delay',   p_base_delay,   86400,    'seconds (one day)'),
                   ('timeout',      p_timeout,      86400,    'seconds (one day)'),
                   ('start_delay',  p_start_delay,  31536000, 'seconds (365 days)'))
           AS o(name, value, max, unit)
     WHERE o.value > o.max
  LOOP
    RAISE EXCEPTION 'Option % of % is %, but it must be at most % %',
      v_option.name, p_subject, v_option.value, v_option.max, v_option.unit
      USING ERRCODE = 'invalid_parameter_value';
  END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION pgflow.create_flow(
  flow_slug    text,
  max_attempts integer DEFAULT 3,
  base_delay   integer DEFAULT 5,
  timeout      integer DEFAULT 60
)
RETURNS pgflow.flows
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_flow pgflow.flows;
  v_twin text;
BEGIN
  -- pgmq.validate_queue_name's limit: its tables are named with a prefix of up to 16
  -- characters (template_pgmq_q_) within PostgreSQL's 63-byte identifiers.
  IF length(create_flow.flow_slug) > 47 THEN
    RAISE EXCEPTION 'Flow slug "%" has % characters, but a flow slug names its pgmq queue, '
                    'and pgmq refuses queue names of more than 47 characters',
      create_flow.flow_slug, length(create_flow.flow_slug)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM pgflow._check_option_bounds(format('flow "%s"', create_flow.flow_slug),
                                      create_flow.max_attempts, create_flow.base_delay,
                                      create_flow.timeout, NULL);

  -- A flow that exists already has its queue; only a new one can collide. The advisory
  -- lock, keyed by the lowercased slug, serialises the creation of two such twins, so that
  -- the second sees the first (in READ COMMITTED, where each statement takes a new
  -- snapshot; the client compiles in it).
  IF NOT EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = create_flow.flow_slug) THEN
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pgflow.create_flow'),
                                             pg_catalog.hashtext(lower(create_flow.flow_slug)));
    SELECT f.flow_slug INTO v_twin
      FROM pgflow.flows f
     WHERE lower(f.flow_slug) = lower(create_flow.flow_slug)
       AND f.flow_slug <> create_flow.flow_slug
     ORDER BY f.flow_slug
     LIMIT 1;
    IF FOUND THEN
      RAISE EXCEPTION 'Flow slug "%" collides with existing flow "%": pgmq lowercases queue '
                      'names, so both flows would share queue pgmq.q_%',
        create_flow.flow_slug, v_twin, lower(create_flow.flow_slug)
        USING ERRCODE = 'duplicate_object';
    END IF;
  END IF;

  INSERT INTO pgflow.flows (flow_slug, opt_max_attempts, opt_base_delay, opt_timeout)
  VALUES (create_flow.flow_slug, create_flow.max_attempts, create_flow.base_delay, create_flow.timeout)
  ON CONFLICT ON CONSTRAINT flows_pkey DO NOTHING
  RETURNING * INTO v_flow;

  IF NOT FOUND THEN
    SELECT * INTO v_flow FROM pgflow.flows f WHERE f.flow_slug = create_flow.flow_slug;
  END IF;

  -- Checked first: pgmq.create would take an advisory lock and run DDL every time.
  IF NOT EXISTS (
    SELECT 1 FROM pgmq.list_queues() q WHERE q.queue_name = create_flow.flow_slug
  ) THEN
    PERFORM pgmq.create(create_flow.flow_slug);
    PERFORM pgflow._create_queue_functions(create_flow.flow_slug);
  ELSIF pgflow._queue_function('read', create_flow.flow_slug) IS NULL
     OR pgflow._queue_function('send', create_flow.flow_slug) IS NULL THEN
    -- A queue made before its flow, or by an installation without these functions.
    PERFORM pgflow._create_queue_functions(create_flow.flow_slug);
  END IF;

  RETURN v_flow;
END;
$$;

CREATE OR REPLACE FUNCTION pgflow.add_step(
  flow_slug    text,
  step_slug    text,
  deps_slugs   text[]  DEFAULT '{}',
  max_attempts integer DEFAULT NULL,
  base_delay   integer DEFAULT NULL,
  timeout      integer DEFAULT NULL,
  start_delay  integer DEFAULT NULL,
  step_type    text    DEFAULT 'single'
)
RETURNS pgflow.steps
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
AS $$
DECLARE
  v_deps text[] := coalesce(add_step.deps_slugs, '{}');
  v_step pgflow.steps;
BEGIN
  IF add_step.step_type = 'map' AND cardinality(v_deps) > 1 THEN
    RAISE EXCEPTION 'Map step "%" can have at most one dependency, but % were provided: %',
      add_step.step_slug, cardinality(v_deps), array_to_string(v_deps, ', ');
  END IF;
  PERFORM pgflow._check_option_bounds(
    format('step "%s" of flow "%s"', add_step.step_slug, add_step.flow_slug),
    add_step.max_attempts, add_step.base_delay, add_step.timeout, add_step.start_delay);

  -- Serialises definitions of one flow so step_index stays dense and ordered. An
  -- unknown flow finds no row here and fails on steps_flow_slug_fkey below.
  PERFORM 1 FROM pgflow.flows f WHERE f.flow_slug = add_step.flow_slug FOR NO KEY UPDATE;

  SELECT * INTO v_step
    FROM pgflow.steps s
   WHERE s.flow_slug = add_step.flow_slug
     AND s.step_slug = add_step.step_slug;
  IF FOUND THEN
    RETURN v_step;
  END IF;

  INSERT INTO pgflow.steps (
    flow_slug, step_slug, step_type, step_index, deps_count,
    opt_max_attempts, opt_base_delay, opt_timeout, opt_start_delay
  )
  VALUES (
    add_step.flow_slug, add_step.step_slug, add_step.step_type,
    (SELECT coalesce(max(s.step_index) + 1, 0) FROM pgflow.steps s
      WHERE s.flow_slug = add_step.flow_slug),
    cardinality(v_deps),
    add_step.max_attempts, add_step.base_delay, add_step.timeout, add_step.start_delay
  )
  RETURNING * INTO v_step;

  INSERT INTO pgflow.deps (flow_slug, dep_slug, step_slug)
  SELECT add_step.flow_slug, d.dep_slug, add_step.step_slug
    FROM unnest(v_deps) AS d(dep_slug);

  RETURN v_step;
END;
$$;

-- Like every function of the schema, not for public; but for every role that may run
-- create_flow or add_step, which call it as their caller (as _create_queue_functions grants
-- the queue functions).
REVOKE EXECUTE ON FUNCTION pgflow._check_option_bounds(text, integer, integer, integer, integer)
  FROM public;
DO $$
DECLARE
  v_grantee text;
BEGIN
  FOR v_grantee IN
    SELECT DISTINCT acl.grantee::regrole::text
      FROM pg_catalog.pg_proc p
     CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS acl
     WHERE p.oid IN ('pgflow.create_flow(text, integer, integer, integer)'::regprocedure,
                     'pgflow.add_step(text, text, text[], integer, integer, integer, integer, text)'::regprocedure)
       AND acl.privilege_type = 'EXECUTE'
       AND acl.grantee <> 0
       AND acl.grantee <> p.proowner
     ORDER BY 1
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                   'pgflow._check_option_bounds(text, integer, integer, integer, integer) TO %s',
                   v_grantee);
  END LOOP;
END;
$$;
