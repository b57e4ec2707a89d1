-- ledger_post, version 1 (ledger migration 0004).
-- Frozen: a migration loads it. A change is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- THE posting engine on PostgreSQL: ledger.services.transfers_post calls it for every batch, and SQL
-- of other apps that moves points (settlement_redemption_hold) calls it too. Its rules are those of
-- transfers_post's docstring, and the portable engine (the same steps in Python, which SQLite runs)
-- gives the same results and refusals (tests/ledger/test_posting_engines.py).
--
-- The transfers are given in order, one array element each (their keys unique; metadata a JSON array
-- of objects); each leg names its transfer by its position in p_keys (from 1), an account id and a
-- signed amount in mg. The caller has checked what Python checks before anything is written (key
-- length, kinds, non-zero integer amounts, metadata size); the database's constraints check them again.
--
-- 1. The transfers, in key order (byte order): a fixed order, so concurrent batches cannot deadlock on
--    each other's keys. A key that exists, or that a concurrent transaction inserts meanwhile (waited
--    for), is skipped: its original transfer stands, whatever the legs given now.
-- 2. The new transfers' postings, in the order given, so posting ids follow it.
-- 3. The touched accounts locked FOR NO KEY UPDATE in ascending id order (the lock the balance UPDATE
--    takes anyway; it leaves foreign-key checks of other rows free) and read under the lock.
-- 4. The checks, applying the new transfers in the order given to the balances read: the first
--    transfer that breaks a rule is refused, with the first rule it breaks, SQLSTATE and figures (JSON
--    in the error's DETAIL) as ledger.services.ledger_refusal reads them (bounds that need no order
--    clear nearly every batch in one look; only a batch they do not clear is applied step by step):
--      LG001 unknown account        {"account_ids": [...]}              (before the other checks)
--      LG002 unbalanced transfer    {"key", "total"}
--      LG003 cross-issuer transfer  {"key", "per_issuer": {issuer: mg}}
--      LG004 insufficient balance   {"key", "account_id", "kind", "balance"}  (a kind >= 0 below zero)
--      LG005 balance out of range   {"key", "account_id", "kind", "balance"}  (a kind <= 0 above zero)
--    Within a transfer accounts are taken in id order. The error rolls back everything the call wrote.
-- 5. One netted balance update per touched account: a hot issuer account is written once a batch.
--
-- Returns one row per transfer given: its key, its id, and whether this call created it.
CREATE FUNCTION ledger_post(
    p_now timestamptz,
    p_keys text[],
    p_kinds text[],
    p_metadata jsonb,
    p_leg_transfers integer[],
    p_leg_accounts bigint[],
    p_leg_amounts bigint[]
) RETURNS TABLE (transfer_key text, transfer_id bigint, created boolean) LANGUAGE plpgsql
AS $$
DECLARE
    new_ids bigint[];           -- per transfer given: the id this call gave it, or 0 if its key existed
    created_count integer;
    verdict record;
    problem record;
BEGIN
    -- 1 and 2: the transfers, then the new ones' postings, in one statement.
    WITH given AS (
        SELECT u.key, u.kind, u.metadata, u.n
          FROM ROWS FROM (unnest(p_keys), unnest(p_kinds), jsonb_array_elements(p_metadata))
               WITH ORDINALITY AS u(key, kind, metadata, n)
    ), inserted AS (
        INSERT INTO ledger_transfer (idempotency_key, kind, metadata, created_at)
        SELECT g.key, g.kind, g.metadata, p_now
          FROM given g
         ORDER BY g.key COLLATE "C"
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING idempotency_key, id
    ), made AS (
        SELECT g.n, i.id FROM given g JOIN inserted i ON i.idempotency_key = g.key
    ), posted AS (
        INSERT INTO ledger_posting (transfer_id, account_id, amount, created_at)
        SELECT m.id, l.account, l.amount, p_now
          FROM unnest(p_leg_transfers, p_leg_accounts, p_leg_amounts) WITH ORDINALITY AS l(at, account, amount, n)
          JOIN made m ON m.n = l.at
         ORDER BY l.n
    )
    SELECT array_agg(COALESCE(m.id, 0) ORDER BY g.n), count(m.id) INTO new_ids, created_count
      FROM given g LEFT JOIN made m ON m.n = g.n;

    -- Zero, never NULL, marks an existing transfer: a subscript of an array without NULLs is a lookup,
    -- with NULLs a walk.
    IF created_count > 0 THEN
        -- 3, a first look at 4, and 5 in one statement: lock the touched accounts in id order, judge
        -- the batch by bounds that need no order (every transfer's issuers sum to zero, and no account
        -- could cross zero even if all its debits came before all its credits, or the reverse), and if
        -- they hold, apply one netted update per account. They hold for nearly every batch; a batch
        -- they do not clear is applied transfer by transfer below, to find its refusal or to pass.
        -- Every row is locked before any is updated: the update waits on the verdict, which counts
        -- every locked row.
        WITH legs AS (
            SELECT l.at, l.account, l.amount
              FROM unnest(p_leg_transfers, p_leg_accounts, p_leg_amounts) AS l(at, account, amount)
             WHERE new_ids[l.at] <> 0
        ), locked AS MATERIALIZED (
            SELECT a.id, a.kind, a.issuer_id, a.balance
              FROM ledger_account a
             WHERE a.id IN (SELECT g.account FROM legs g)
             ORDER BY a.id
               FOR NO KEY UPDATE
        ), bounds AS (
            SELECT a.kind, a.balance + SUM(LEAST(g.amount, 0)) AS lowest, a.balance + SUM(GREATEST(g.amount, 0)) AS highest
              FROM legs g JOIN locked a ON a.id = g.account
             GROUP BY a.id, a.kind, a.balance
        ), judged AS (
            SELECT (SELECT count(*) FROM locked) AS known,
                   (SELECT count(DISTINCT g.account) FROM legs g) AS touched,
                   NOT EXISTS (SELECT FROM legs g JOIN locked a ON a.id = g.account
                                GROUP BY g.at, a.issuer_id HAVING SUM(g.amount) <> 0)
                   AND NOT EXISTS (SELECT FROM bounds b
                                    WHERE b.lowest < 0 AND b.kind IN ('holding_lot', 'wallet_lot', 'redemption_hold',
                                                                      'redeemed', 'expired', 'reversed')
                                       OR b.highest > 0 AND b.kind IN ('issuer_outstanding', 'debt')) AS sound
        ), applied AS (
            UPDATE ledger_account AS a SET balance = a.balance + d.delta
              FROM (SELECT g.account, SUM(g.amount) AS delta FROM legs g GROUP BY g.account HAVING SUM(g.amount) <> 0) d,
                   judged j
             WHERE j.sound AND j.known = j.touched AND a.id = d.account
        )
        SELECT j.known, j.touched, j.sound INTO verdict FROM judged j;
        IF verdict.known < verdict.touched THEN
            RAISE EXCEPTION 'ledger: no such account'
                USING ERRCODE = 'LG001',
                      DETAIL = jsonb_build_object('account_ids', (
                          SELECT to_jsonb((array_agg(DISTINCT l.account ORDER BY l.account))[1:20])
                            FROM unnest(p_leg_transfers, p_leg_accounts) AS l(at, account)
                           WHERE new_ids[l.at] <> 0
                             AND NOT EXISTS (SELECT FROM ledger_account a WHERE a.id = l.account))
                      )::text;
        END IF;

        IF NOT verdict.sound THEN
            -- 4 exactly: apply the transfers in the order given to the balances, read again (this
            -- transaction holds their locks), and refuse the first that breaks a rule.
            WITH legs AS (
                SELECT l.at, l.account, SUM(l.amount) AS amount
                  FROM unnest(p_leg_transfers, p_leg_accounts, p_leg_amounts) AS l(at, account, amount)
                 WHERE new_ids[l.at] <> 0
                 GROUP BY l.at, l.account
            ), steps AS (
                -- Each transfer's effect on each account it touches, and the balance after it.
                SELECT g.at, g.account, a.kind, a.issuer_id, g.amount,
                       a.balance + SUM(g.amount) OVER (PARTITION BY g.account ORDER BY g.at) AS after
                  FROM legs g JOIN ledger_account a ON a.id = g.account
            ), issuers AS (
                SELECT s.at, s.issuer_id, SUM(s.amount) AS total FROM steps s GROUP BY s.at, s.issuer_id
            ), problems AS (
                SELECT x.at, 'LG002' AS state, NULL::bigint AS account, NULL::text AS kind, SUM(x.total) AS figure,
                       NULL::jsonb AS per_issuer
                  FROM issuers x GROUP BY x.at HAVING SUM(x.total) <> 0
                UNION ALL
                SELECT x.at, 'LG003', NULL, NULL, NULL,
                       jsonb_object_agg(x.issuer_id::text, x.total) FILTER (WHERE x.total <> 0)
                  FROM issuers x GROUP BY x.at HAVING bool_or(x.total <> 0)
                UNION ALL
                SELECT s.at, 'LG004', s.account, s.kind, s.after, NULL
                  FROM steps s
                 WHERE s.after < 0
                   AND s.kind IN ('holding_lot', 'wallet_lot', 'redemption_hold', 'redeemed', 'expired', 'reversed')
                UNION ALL
                SELECT s.at, 'LG005', s.account, s.kind, s.after, NULL
                  FROM steps s
                 WHERE s.after > 0 AND s.kind IN ('issuer_outstanding', 'debt')
            )
            SELECT p.at, p.state, p.account, p.kind, p.figure, p.per_issuer INTO problem
              FROM problems p
             ORDER BY p.at, p.state, p.account
             LIMIT 1;
            IF FOUND THEN
                RAISE EXCEPTION 'ledger: transfer % refused (%)', p_keys[problem.at], problem.state
                    USING ERRCODE = problem.state,
                          DETAIL = jsonb_strip_nulls(jsonb_build_object(
                              'key', p_keys[problem.at], 'account_id', problem.account, 'kind', problem.kind,
                              'total', CASE WHEN problem.state = 'LG002' THEN problem.figure END,
                              'balance', CASE WHEN problem.state IN ('LG004', 'LG005') THEN problem.figure END,
                              'per_issuer', problem.per_issuer))::text;
            END IF;
            -- 5, for a batch the bounds did not clear and the order did.
            UPDATE ledger_account AS a SET balance = a.balance + d.delta
              FROM (SELECT l.account, SUM(l.amount) AS delta
                      FROM unnest(p_leg_transfers, p_leg_accounts, p_leg_amounts) AS l(at, account, amount)
                     WHERE new_ids[l.at] <> 0
                     GROUP BY l.account
                    HAVING SUM(l.amount) <> 0) d
             WHERE a.id = d.account;
        END IF;
    END IF;

    RETURN QUERY
        SELECT k.key, COALESCE(NULLIF(new_ids[k.n], 0), t.id), new_ids[k.n] <> 0
          FROM unnest(p_keys) WITH ORDINALITY AS k(key, n)
          LEFT JOIN ledger_transfer t ON new_ids[k.n] = 0 AND t.idempotency_key = k.key;
END $$;
