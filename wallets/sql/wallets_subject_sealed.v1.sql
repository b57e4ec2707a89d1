-- wallets_subject_sealed, version 1 (wallets migration 0003).
-- Frozen: a migration loads it. A change is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- A person's subject id at an institution, sealed (no row unless they are linked there now): the SQL
-- twin of wallets.selectors.subject_sealed_at, for SQL of other apps (settlement_redemption_hold, for
-- the provider's webhook); a plain SQL function, so the planner inlines it into the caller's query.
CREATE FUNCTION wallets_subject_sealed(p_person bigint, p_institution bigint)
RETURNS TABLE (subject_sealed text) LANGUAGE sql STABLE
AS $$
    SELECT m.subject_sealed
      FROM wallets_membership m
     WHERE m.institution_id = p_institution AND m.person_id = p_person AND m.unlinked_at IS NULL
     LIMIT 1
$$;
