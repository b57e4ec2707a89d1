-- ledger_accounts_ensure, version 1 (ledger migration 0004).
-- Frozen: a migration loads it. A change is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- The ids of the accounts named by their identities (one array per column, element i of each
-- naming account i; NULL or '' where a kind has no such part), creating those that do not exist
-- with balance 0. What ledger.services.accounts_ensure does on PostgreSQL for the keys it does not
-- find, and how SQL of other apps gets ledger accounts: the key is built here (ledger_account_key),
-- never by the caller. Returns the accounts' keys and ids, one element per account given, in the order
-- given (two arrays, so SQL callers take the ids in one assignment).
--
-- The accounts are inserted in the order given: callers that may make the same accounts at once give
-- them in one order, so they cannot deadlock on each other's keys (ledger.services.accounts_ensure
-- gives them in key order; the accounts the hold makes are its redemption's own). One that exists, or
-- that a concurrent transaction creates meanwhile (the insert waits for it), is read instead. Never
-- changes an existing account.
CREATE FUNCTION ledger_accounts_ensure(
    p_kinds text[],
    p_issuers bigint[],
    p_persons bigint[],
    p_subjects text[],
    p_expiries date[],
    p_redemptions bigint[],
    p_holders bigint[],
    p_providers bigint[],
    p_now timestamptz,
    OUT account_keys text[],
    OUT account_ids bigint[]
) LANGUAGE plpgsql
AS $$
BEGIN
    -- Inserted in one statement, in the order given; a key that exists is skipped, as is one a
    -- concurrent transaction inserts meanwhile (waited for). Callers ask mostly for new accounts
    -- (ledger.services.accounts_ensure only for keys it did not find), and then the rows come back in
    -- the order given.
    WITH made AS (
        INSERT INTO ledger_account
               (key, kind, issuer_id, person_id, subject_ref, expires_on, redemption_id, holder_institution_id,
                provider_id, balance, created_at)
        SELECT ledger_account_key(u.kind, u.issuer, u.person, u.subject, u.expires_on, u.redemption, u.holder,
                                  u.provider),
               u.kind, u.issuer, u.person, COALESCE(u.subject, ''), u.expires_on, u.redemption, u.holder, u.provider,
               0, p_now
          FROM unnest(p_kinds, p_issuers, p_persons, p_subjects, p_expiries, p_redemptions, p_holders, p_providers)
               WITH ORDINALITY AS u(kind, issuer, person, subject, expires_on, redemption, holder, provider, n)
         ORDER BY u.n
        ON CONFLICT (key) DO NOTHING
        RETURNING key, id
    )
    SELECT array_agg(m.key), array_agg(m.id) INTO account_keys, account_ids FROM made m;
    IF account_keys IS NULL OR cardinality(account_keys) < cardinality(p_kinds) THEN
        -- Some existed (or were given twice): every key in the order given, and its id.
        account_ids := ARRAY(
            SELECT COALESCE(m.id, a.id)
              FROM unnest(p_kinds, p_issuers, p_persons, p_subjects, p_expiries, p_redemptions, p_holders, p_providers)
                   WITH ORDINALITY AS u(kind, issuer, person, subject, expires_on, redemption, holder, provider, n)
              CROSS JOIN LATERAL (SELECT ledger_account_key(u.kind, u.issuer, u.person, u.subject, u.expires_on,
                                                            u.redemption, u.holder, u.provider) AS key) k
              LEFT JOIN unnest(account_keys, account_ids) AS m(key, id) ON m.key = k.key
              LEFT JOIN ledger_account a ON m.id IS NULL AND a.key = k.key
             ORDER BY u.n);
        account_keys := ARRAY(
            SELECT ledger_account_key(u.kind, u.issuer, u.person, u.subject, u.expires_on, u.redemption, u.holder,
                                      u.provider)
              FROM unnest(p_kinds, p_issuers, p_persons, p_subjects, p_expiries, p_redemptions, p_holders, p_providers)
                   WITH ORDINALITY AS u(kind, issuer, person, subject, expires_on, redemption, holder, provider, n)
             ORDER BY u.n);
    END IF;
END $$;
