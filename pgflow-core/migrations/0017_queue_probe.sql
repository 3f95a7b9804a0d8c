-- =====================================================================================
-- pgflow engine, migration 0017: one probe for the queues of many flows.
--
-- A worker serving many flows used to poll each flow's queue on its own: idle, every
-- queue once per max_poll_wait (or per poll_interval without notifications), one
-- statement each, so a worker of 1,000 flows sent hundreds of statements a second doing
-- nothing. pgflow.queue_probe answers for all of them in one statement: for each flow
-- whose queue holds a message, when its earliest message is (or was) visible. The worker
-- then reads only the queues that have something due, and sleeps until the earliest
-- future one.
--
-- It runs as its caller and skips, instead of failing, every slug it cannot answer for:
-- no queue table (the flow was never compiled here, or its queue was dropped), a queue
-- table the caller may not read (a flow the role does not serve), a table that is not
-- a pgmq queue, or one another session holds locked for more than 50 ms. One stale or foreign slug must not blind the worker to all its other
-- flows.
-- =====================================================================================

-- For each distinct slug of p_flow_slugs whose queue pgmq.q_<lower(slug)> exists, can be
-- read by the caller and holds at least one message: the slug as given and the earliest
-- visibility time of its messages (a time in the past: a message is visible now). Each
-- queue costs one probe of pgmq's index on vt. Slugs with an empty queue are left out.
CREATE FUNCTION pgflow.queue_probe(p_flow_slugs text[])
RETURNS TABLE (flow_slug text, next_vt timestamptz)
LANGUAGE plpgsql
STABLE
SET search_path = ''
-- A queue table another session holds (a flow being deleted, a long DDL) is skipped after
-- this short wait, not waited for: the worker would otherwise see none of its flows.
SET lock_timeout = '50ms'
AS $$
DECLARE
  v_slug text;
  v_table regclass;
  v_vt timestamptz;
BEGIN
  FOR v_slug IN
    SELECT DISTINCT s.slug FROM unnest(p_flow_slugs) AS s(slug) WHERE s.slug IS NOT NULL
  LOOP
    -- pgmq names a queue's table q_<lower(queue name)>; %I quotes whatever the slug holds.
    v_table := pg_catalog.to_regclass(format('pgmq.%I', 'q_' || pg_catalog.lower(v_slug)));
    CONTINUE WHEN v_table IS NULL
               OR NOT pg_catalog.has_table_privilege(v_table, 'SELECT');
    BEGIN
      EXECUTE format('SELECT pg_catalog.min(q.vt) FROM %s q', v_table) INTO v_vt;
    EXCEPTION
      -- Dropped since the lookup above, not a queue (no vt column), or locked by another
      -- session past lock_timeout (lock_not_available): this slug only. Cancellations and
      -- statement timeouts (query_canceled) are not caught by OTHERS and end the probe.
      WHEN OTHERS THEN
        CONTINUE;
    END;
    CONTINUE WHEN v_vt IS NULL;
    flow_slug := v_slug;
    next_vt := v_vt;
    RETURN NEXT;
  END LOOP;
END;
$$;

-- -------------------------------------------------------------------------------------
-- Privileges: the owner's until granted (docs/security.md)
-- -------------------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION pgflow.queue_probe(text[]) FROM public;

-- Whoever may read tasks may probe the queues: deployments granted before this migration
-- keep working when their workers start probing. The probe reads only the queues the
-- caller may read itself.
DO $$
DECLARE
  v_grantee text;
BEGIN
  FOR v_grantee IN
    SELECT DISTINCT pg_catalog.pg_get_userbyid(a.grantee)
      FROM pg_catalog.pg_proc p
     CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
     WHERE p.oid = 'pgflow._read_and_start(text, integer, integer, uuid)'::regprocedure
       AND a.privilege_type = 'EXECUTE'
       AND a.grantee <> 0
       AND a.grantee <> p.proowner
  LOOP
    EXECUTE format('GRANT EXECUTE ON FUNCTION pgflow.queue_probe(text[]) TO %I', v_grantee);
  END LOOP;
END;
$$;
