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
-- The missing accounts are inserted in key order (byte order), so concurrent callers cannot
-- deadlock on each other's keys; one created meanwhile by a concurrent transaction is read after the
-- insert has waited for it. Never changes an existing account.
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
    wanted text[];              -- the same, once each
    found_keys text[];
    found_ids bigint[];
    made_keys text[];
    made_ids bigint[];
BEGIN
    SELECT array_agg(ledger_account_key(u.kind, u.issuer, u.person, u.subject, u.expires_on, u.redemption, u.holder,
                                        u.provider) ORDER BY u.n)
      INTO given
      FROM unnest(p_kinds, p_issuers, p_persons, p_subjects, p_expiries, p_redemptions, p_holders, p_providers)
           WITH ORDINALITY AS u(kind, issuer, person, subject, expires_on, redemption, holder, provider, n);
    SELECT array_agg(DISTINCT g.key) INTO wanted FROM unnest(given) AS g(key);
    SELECT COALESCE(array_agg(a.key), '{}'), COALESCE(array_agg(a.id), '{}') INTO found_keys, found_ids
      FROM ledger_account a
     WHERE a.key = ANY(wanted);
    IF cardinality(found_keys) < cardinality(wanted) THEN
        WITH missing AS (
            SELECT DISTINCT ON (k.key) k.key, u.kind, u.issuer, u.person, COALESCE(u.subject, '') AS subject,
                   u.expires_on, u.redemption, u.holder, u.provider
              FROM unnest(p_kinds, p_issuers, p_persons, p_subjects, p_expiries, p_redemptions, p_holders,
                          p_providers) AS u(kind, issuer, person, subject, expires_on, redemption, holder, provider),
                   LATERAL (SELECT ledger_account_key(u.kind, u.issuer, u.person, u.subject, u.expires_on,
                                                      u.redemption, u.holder, u.provider) AS key) k
                   LEFT JOIN unnest(found_keys) AS f(key) ON f.key = k.key
             WHERE f.key IS NULL
        ), made AS (
            INSERT INTO ledger_account
                   (key, kind, issuer_id, person_id, subject_ref, expires_on, redemption_id, holder_institution_id,
                    provider_id, balance, created_at)
            SELECT m.key, m.kind, m.issuer, m.person, m.subject, m.expires_on, m.redemption, m.holder, m.provider,
                   0, p_now
              FROM missing m
             ORDER BY m.key COLLATE "C"
            ON CONFLICT (key) DO NOTHING
            RETURNING key, id
        )
        SELECT COALESCE(array_agg(made.key), '{}'), COALESCE(array_agg(made.id), '{}') INTO made_keys, made_ids
          FROM made;
        found_keys := found_keys || made_keys;
        found_ids := found_ids || made_ids;
        IF cardinality(found_keys) < cardinality(wanted) THEN  -- created by a concurrent transaction
            SELECT found_keys || array_agg(a.key), found_ids || array_agg(a.id) INTO found_keys, found_ids
              FROM ledger_account a
             WHERE a.key = ANY(wanted) AND NOT a.key = ANY(found_keys);
        END IF;
    END IF;
    RETURN QUERY
        SELECT g.n::integer, g.key, f.id
          FROM unnest(given) WITH ORDINALITY AS g(key, n)
          JOIN unnest(found_keys, found_ids) AS f(key, id) ON f.key = g.key
         ORDER BY g.n;
END $$;
