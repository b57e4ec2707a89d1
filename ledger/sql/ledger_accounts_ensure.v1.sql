-- ledger_accounts_ensure, version 1 (ledger migration 0004).
-- Frozen: a migration loads it. A change is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- The ids of the accounts named by their identities (one array per column, element i of each
-- naming account i; NULL or '' where a kind has no such part), creating those that do not exist
-- with balance 0. What ledger.services.accounts_ensure does on PostgreSQL for the keys it does not
-- find, and how SQL of other apps gets ledger accounts: the key is built here (ledger_account_key),
-- never by the caller. Returns one row per account given, in the order given: its position (from 1),
-- key and id.
--
-- The accounts are inserted in key order, so concurrent callers cannot deadlock on each other's keys
-- (every account on PostgreSQL is made here); one that exists, or that a concurrent transaction creates
-- meanwhile (the insert waits for it), is read instead. Never changes an existing account.
CREATE FUNCTION ledger_accounts_ensure(
    p_kinds text[],
    p_issuers bigint[],
    p_persons bigint[],
    p_subjects text[],
    p_expiries date[],
    p_redemptions bigint[],
    p_holders bigint[],
    p_providers bigint[],
    p_now timestamptz
) RETURNS TABLE (ordinal integer, account_key text, account_id bigint) LANGUAGE plpgsql
AS $$
DECLARE
    given text[];               -- the keys, in the order given
    ids bigint[];               -- their ids, NULL where not yet known
BEGIN
    -- Inserted in one statement; a key that exists is skipped (its id read below), as is one a
    -- concurrent transaction inserts meanwhile (waited for). Callers ask mostly for new accounts:
    -- ledger.services.accounts_ensure only for keys it did not find.
    WITH keyed AS (
        SELECT u.n, ledger_account_key(u.kind, u.issuer, u.person, u.subject, u.expires_on, u.redemption, u.holder,
                                       u.provider) AS key,
               u.kind, u.issuer, u.person, COALESCE(u.subject, '') AS subject, u.expires_on, u.redemption, u.holder,
               u.provider
          FROM unnest(p_kinds, p_issuers, p_persons, p_subjects, p_expiries, p_redemptions, p_holders, p_providers)
               WITH ORDINALITY AS u(kind, issuer, person, subject, expires_on, redemption, holder, provider, n)
    ), made AS (
        INSERT INTO ledger_account
               (key, kind, issuer_id, person_id, subject_ref, expires_on, redemption_id, holder_institution_id,
                provider_id, balance, created_at)
        SELECT DISTINCT ON (k.key) k.key, k.kind, k.issuer, k.person, k.subject, k.expires_on, k.redemption, k.holder,
               k.provider, 0, p_now
          FROM keyed k
         ORDER BY k.key
        ON CONFLICT (key) DO NOTHING
        RETURNING key, id
    )
    SELECT array_agg(k.key ORDER BY k.n), array_agg(m.id ORDER BY k.n) INTO given, ids
      FROM keyed k LEFT JOIN made m ON m.key = k.key;
    IF array_position(ids, NULL) IS NOT NULL THEN
        SELECT array_agg(COALESCE(g.id, a.id) ORDER BY g.n) INTO ids
          FROM unnest(given, ids) WITH ORDINALITY AS g(key, id, n)
          LEFT JOIN ledger_account a ON g.id IS NULL AND a.key = g.key;
    END IF;
    RETURN QUERY SELECT g.n::integer, g.key, g.id FROM unnest(given, ids) WITH ORDINALITY AS g(key, id, n);
END $$;
