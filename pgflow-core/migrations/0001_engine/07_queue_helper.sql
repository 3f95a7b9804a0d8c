-- -------------------------------------------------------------------------------------
-- Queue helper
-- -------------------------------------------------------------------------------------

-- Updates pgmq.q_<queue> directly (one statement, so a missing queue is PostgreSQL's own
-- 42P01), locking the rows in msg_id order (lock level 5).
CREATE FUNCTION pgflow.set_vt_batch(queue_name text, msg_ids bigint[], vt_offsets integer[])
RETURNS TABLE (
  msg_id      bigint,
  read_ct     integer,
  enqueued_at timestamptz,
  vt          timestamptz,
  message     jsonb,
  headers     jsonb
)
LANGUAGE plpgsql
VOLATILE
SET search_path = ''
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
  IF coalesce(cardinality(set_vt_batch.msg_ids), 0) <> coalesce(cardinality(set_vt_batch.vt_offsets), 0) THEN
    RAISE EXCEPTION 'msg_ids length (%) must equal vt_offsets length (%)',
      coalesce(cardinality(set_vt_batch.msg_ids), 0), coalesce(cardinality(set_vt_batch.vt_offsets), 0);
  END IF;
  IF coalesce(cardinality(set_vt_batch.msg_ids), 0) = 0 THEN
    RETURN;
  END IF;

  RETURN QUERY EXECUTE format(
    $q$
    WITH locked AS (
      SELECT q.msg_id FROM pgmq.%1$I q WHERE q.msg_id = ANY($1) ORDER BY q.msg_id FOR UPDATE
    )
    UPDATE pgmq.%1$I q
       SET vt = clock_timestamp() + make_interval(secs => o.vt_offset)
      FROM locked
      JOIN unnest($1, $2) AS o(msg_id, vt_offset) ON o.msg_id = locked.msg_id
     WHERE q.msg_id = locked.msg_id
    RETURNING q.msg_id, q.read_ct, q.enqueued_at, q.vt, q.message, q.headers
    $q$,
    pgmq.format_table_name(set_vt_batch.queue_name, 'q')
  ) USING set_vt_batch.msg_ids, set_vt_batch.vt_offsets;
END;
$$;

