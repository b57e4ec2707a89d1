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
    p_now timestamptz,
    OUT account_keys text[],
    OUT account_ids bigint[]
) LANGUAGE plpgsql
AS $$
DECLARE
    made_keys text[];
    made_ids bigint[];
BEGIN
    account_keys := ARRAY(
        SELECT ledger_account_key(u.kind, u.issuer, u.person, u.subject, u.expires_on, u.redemption, u.holder, u.provider)
          FROM unnest(p_kinds, p_issuers, p_persons, p_subjects, p_expiries, p_redemptions, p_holders, p_providers)
               AS u(kind, issuer, person, subject, expires_on, redemption, holder, provider));
    -- Inserted in one statement, in key order; a key that exists is skipped (its id read below), as
    -- is one a concurrent transaction inserts meanwhile (waited for). Callers ask mostly for new
    -- accounts: ledger.services.accounts_ensure only for keys it did not find.
    WITH made AS (
        INSERT INTO ledger_account
               (key, kind, issuer_id, person_id, subject_ref, expires_on, redemption_id, holder_institution_id,
                provider_id, balance, created_at)
        SELECT u.key, u.kind, u.issuer, u.person, COALESCE(u.subject, ''), u.expires_on, u.redemption, u.holder,
               u.provider, 0, p_now
          FROM unnest(account_keys, p_kinds, p_issuers, p_persons, p_subjects, p_expiries, p_redemptions, p_holders,
                      p_providers) AS u(key, kind, issuer, person, subject, expires_on, redemption, holder, provider)
         ORDER BY u.key
        ON CONFLICT (key) DO NOTHING
        RETURNING key, id
    )
    SELECT array_agg(m.key), array_agg(m.id) INTO made_keys, made_ids FROM made m;
    IF cardinality(made_keys) = cardinality(account_keys) AND cardinality(account_keys) <= 16 THEN
        -- All made, and few (the hold accounts of a redemption, one per issuer): put them in the order given.
        account_ids := ARRAY(SELECT made_ids[array_position(made_keys, g.key)] FROM unnest(account_keys) AS g(key));
    ELSE
        account_ids := ARRAY(
            SELECT COALESCE(m.id, a.id)
              FROM unnest(account_keys) WITH ORDINALITY AS g(key, n)
              LEFT JOIN unnest(made_keys, made_ids) AS m(key, id) ON m.key = g.key
              LEFT JOIN ledger_account a ON m.id IS NULL AND a.key = g.key
             ORDER BY g.n);
    END IF;
END $$;
