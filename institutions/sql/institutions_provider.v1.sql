-- institutions_provider, version 1 (institutions migration 0008).
-- Frozen: a migration loads it. A change is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- An institution as a reward's provider: its code, and whether it provides now (active and a
-- provider). The SQL twin of institutions.selectors.provider_state, for SQL of other apps
-- (settlement_redemption_hold); a plain SQL function, so the planner inlines it into the caller's query.
CREATE FUNCTION institutions_provider(p_institution bigint)
RETURNS TABLE (code text, providing boolean) LANGUAGE sql STABLE
AS $$
    SELECT i.code, i.status = 'active' AND i.is_provider
      FROM institutions_institution i
     WHERE i.id = p_institution
$$;
