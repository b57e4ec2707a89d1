-- institutions_codes, version 1 (institutions migration 0008).
-- Frozen: a migration loads it. A change is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- The codes of the institutions with the given ids: the SQL twin of institutions.selectors.institution_codes,
-- for SQL of other apps (settlement_redemption_hold); a plain SQL function, so the planner inlines it.
CREATE FUNCTION institutions_codes(p_ids bigint[])
RETURNS TABLE (id bigint, code text) LANGUAGE sql STABLE
AS $$
    SELECT i.id, i.code FROM institutions_institution i WHERE i.id = ANY(p_ids)
$$;
