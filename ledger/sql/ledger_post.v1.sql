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
--    in the error's DETAIL) as ledger.services.ledger_refusal reads them. A one-transfer batch is
--    checked by a loop over its few legs (its final balances are its only ones); a larger batch first
--    by bounds that need no order, which clear nearly every batch in one statement. Only a batch that
--    fails these is applied transfer by transfer in SQL, to find its refusal or to pass:
--      LG001 unknown account        {"account_ids": [...]}              (before the other checks)
--      LG002 unbalanced transfer    {"key", "total"}
--      LG003 cross-issuer transfer  {"key", "per_issuer": {issuer: mg}}
--      LG004 insufficient balance   {"key", "account_id", "kind", "balance"}  (a kind >= 0 below zero)
--      LG005 balance out of range   {"key", "account_id", "kind", "balance"}  (a kind <= 0 above zero)
--    Within a transfer accounts are taken in id order. The error rolls back everything the call wrote.
-- 5. One netted balance update per touched account: a hot issuer account is written once a batch.
--
-- Returns, per transfer given and in that order, its id and whether this call created it (two arrays).
CREATE FUNCTION ledger_post(
    p_now timestamptz,
    p_keys text[],
    p_kinds text[],
    p_metadata jsonb,
    p_leg_transfers integer[],
    p_leg_accounts bigint[],
    p_leg_amounts bigint[],
    OUT transfer_ids bigint[],
    OUT created boolean[]
) LANGUAGE plpgsql
AS $$
DECLARE
    new_ids bigint[];           -- per transfer given: the id this call gave it, or 0 if its key existed
    created_count integer;
    one bigint;
    touched bigint[];           -- the accounts of the new transfers' legs
    locked_ids bigint[];        -- the touched accounts as locked, in id order
    locked_kinds text[];
    locked_issuers bigint[];
    before bigint[];            -- the touched accounts' balances as locked
    after bigint[];             -- a one-transfer batch: each locked account's balance after it
    issuers bigint[];           -- ... and its sum per issuer
    issuer_sums bigint[];
    at integer;
    sound boolean;
    unknown boolean;
    problem record;
BEGIN
    -- 1 and 2: the transfers, then the new ones' postings. Zero, never NULL, marks a transfer whose
    -- key existed in new_ids: a subscript of an array without NULLs is a lookup, with NULLs a walk.
    IF cardinality(p_keys) = 1 THEN
        WITH inserted AS (
            INSERT INTO ledger_transfer (idempotency_key, kind, metadata, created_at)
            VALUES (p_keys[1], p_kinds[1], p_metadata -> 0, p_now)
            ON CONFLICT (idempotency_key) DO NOTHING
            RETURNING id
        ), posted AS (
            INSERT INTO ledger_posting (transfer_id, account_id, amount, created_at)
            SELECT i.id, l.account, l.amount, p_now
              FROM inserted i, unnest(p_leg_accounts, p_leg_amounts) WITH ORDINALITY AS l(account, amount, n)
             ORDER BY l.n
        )
        SELECT i.id INTO one FROM inserted i;
        new_ids := ARRAY[COALESCE(one, 0)];
        created_count := CASE WHEN one IS NULL THEN 0 ELSE 1 END;
    ELSE
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
    END IF;

    IF created_count > 0 THEN
        -- 3: the touched accounts locked in id order and read under the lock (aggregated over the
        -- locking subquery, so every row it names is locked before it is read).
        IF created_count = cardinality(p_keys) THEN
            touched := p_leg_accounts;
        ELSE
            touched := ARRAY(SELECT l.account FROM unnest(p_leg_transfers, p_leg_accounts) AS l(at, account)
                              WHERE new_ids[l.at] <> 0);
        END IF;
        -- The aggregates take the rows in the subquery's order: no sort of their own.
        SELECT array_agg(a.id), array_agg(a.kind), array_agg(a.issuer_id), array_agg(a.balance)
          INTO locked_ids, locked_kinds, locked_issuers, before
          FROM (SELECT a.id, a.kind, a.issuer_id, a.balance
                  FROM ledger_account a
                 WHERE a.id = ANY(touched)
                 ORDER BY a.id
                   FOR NO KEY UPDATE) a;
        -- An account that does not exist: looked for among a transfer's few legs, or counted in a batch.
        IF cardinality(p_keys) = 1 THEN
            unknown := COALESCE(cardinality(locked_ids), 0) < cardinality(touched)
                       AND EXISTS (SELECT FROM unnest(touched) AS t(id) WHERE NOT t.id = ANY(COALESCE(locked_ids, '{}')));
        ELSE
            unknown := COALESCE(cardinality(locked_ids), 0) < (SELECT count(DISTINCT t.id) FROM unnest(touched) AS t(id));
        END IF;
        IF unknown THEN
            RAISE EXCEPTION 'ledger: no such account'
                USING ERRCODE = 'LG001',
                      DETAIL = jsonb_build_object('account_ids', (
                          SELECT to_jsonb((array_agg(DISTINCT t.id ORDER BY t.id))[1:20])
                            FROM unnest(touched) AS t(id)
                           WHERE NOT t.id = ANY(COALESCE(locked_ids, '{}')))
                      )::text;
        END IF;

        -- 4, a first look.
        IF cardinality(p_keys) = 1 THEN
            -- One transfer, a few legs: its balances after it and its sum per issuer, in a loop.
            after := before;
            FOR i IN 1 .. cardinality(p_leg_accounts) LOOP
                at := array_position(locked_ids, p_leg_accounts[i]);
                after[at] := after[at] + p_leg_amounts[i];
                IF locked_issuers[at] = ANY(issuers) THEN
                    issuer_sums[array_position(issuers, locked_issuers[at])] :=
                        issuer_sums[array_position(issuers, locked_issuers[at])] + p_leg_amounts[i];
                ELSE
                    issuers := issuers || locked_issuers[at];
                    issuer_sums := issuer_sums || p_leg_amounts[i];
                END IF;
            END LOOP;
            sound := 0 = ALL(issuer_sums);
            FOR i IN 1 .. cardinality(locked_ids) LOOP
                IF after[i] < 0 AND locked_kinds[i] IN ('holding_lot', 'wallet_lot', 'redemption_hold', 'redeemed',
                                                        'expired', 'reversed')
                   OR after[i] > 0 AND locked_kinds[i] IN ('issuer_outstanding', 'debt') THEN
                    sound := false;
                END IF;
            END LOOP;
        ELSE
            -- Bounds that need no order: every transfer's issuers sum to zero, and no account could
            -- cross zero even if all its debits came before all its credits (or the reverse).
            WITH legs AS (
                SELECT l.at, l.account, l.amount, a.kind, a.issuer_id, a.balance
                  FROM unnest(p_leg_transfers, p_leg_accounts, p_leg_amounts) AS l(at, account, amount)
                  JOIN unnest(locked_ids, locked_kinds, locked_issuers, before) AS a(id, kind, issuer_id, balance)
                    ON a.id = l.account
                 WHERE new_ids[l.at] <> 0
            )
            SELECT NOT EXISTS (SELECT FROM legs g GROUP BY g.at, g.issuer_id HAVING SUM(g.amount) <> 0)
                   AND NOT EXISTS (
                       SELECT FROM legs g GROUP BY g.account, g.kind, g.balance
                       HAVING g.kind IN ('holding_lot', 'wallet_lot', 'redemption_hold', 'redeemed', 'expired',
                                         'reversed') AND g.balance + SUM(LEAST(g.amount, 0)) < 0
                           OR g.kind IN ('issuer_outstanding', 'debt') AND g.balance + SUM(GREATEST(g.amount, 0)) > 0)
              INTO sound;
        END IF;

        IF NOT sound THEN
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
            ), per_issuer AS (
                SELECT s.at, s.issuer_id, SUM(s.amount) AS total FROM steps s GROUP BY s.at, s.issuer_id
            ), problems AS (
                SELECT x.at, 'LG002' AS state, NULL::bigint AS account, NULL::text AS kind, SUM(x.total) AS figure,
                       NULL::jsonb AS per_issuer
                  FROM per_issuer x GROUP BY x.at HAVING SUM(x.total) <> 0
                UNION ALL
                SELECT x.at, 'LG003', NULL, NULL, NULL,
                       jsonb_object_agg(x.issuer_id::text, x.total) FILTER (WHERE x.total <> 0)
                  FROM per_issuer x GROUP BY x.at HAVING bool_or(x.total <> 0)
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
        END IF;

        -- 5: one netted update per touched account (a one-transfer batch has its balances after it).
        IF cardinality(p_keys) = 1 THEN
            UPDATE ledger_account AS a SET balance = u.after
              FROM unnest(locked_ids, before, after) AS u(id, before, after)
             WHERE a.id = u.id AND u.after <> u.before;
        ELSE
            UPDATE ledger_account AS a SET balance = a.balance + d.delta
              FROM (SELECT l.account, SUM(l.amount) AS delta
                      FROM unnest(p_leg_transfers, p_leg_accounts, p_leg_amounts) AS l(at, account, amount)
                     WHERE new_ids[l.at] <> 0
                     GROUP BY l.account
                    HAVING SUM(l.amount) <> 0) d
             WHERE a.id = d.account;
        END IF;
    END IF;

    IF created_count = cardinality(p_keys) THEN
        transfer_ids := new_ids;
        created := array_fill(true, ARRAY[created_count]);
    ELSE
        SELECT array_agg(COALESCE(NULLIF(new_ids[k.n], 0), t.id) ORDER BY k.n), array_agg(new_ids[k.n] <> 0 ORDER BY k.n)
          INTO transfer_ids, created
          FROM unnest(p_keys) WITH ORDINALITY AS k(key, n)
          LEFT JOIN ledger_transfer t ON new_ids[k.n] = 0 AND t.idempotency_key = k.key;
    END IF;
END $$;
