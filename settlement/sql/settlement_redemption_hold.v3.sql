-- settlement_redemption_hold, version 3 (settlement migration 0008): the one in use.
-- Frozen once released: a change to the function is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- A redemption hold in one call: the database engine of settlement.services.holds, making the same
-- decisions and writes as the portable engine (settlement.services.hold_portable), which
-- tests/settlement/test_hold_engines.py holds equal. What it writes in other apps' books it writes
-- through their functions, and what it reads of them through their readers:
--   ledger        ledger_person_lots (the person's lots and debts), ledger_accounts_ensure (the hold
--                 accounts, their keys written by the ledger) and ledger_post (the transfer: postings,
--                 locks, checks and balances);
--   institutions  institutions_provider and institutions_codes (the provider and the issuers' codes),
--                 institutions_outbox_enqueue (the provider's webhook, its CloudEvent built by the edge);
--   wallets       wallets_subject_sealed (the person's link at the provider, for the webhook).
-- Its own tables it writes itself: the redemption, its allocations, the stock and the key's answer.
--
-- Answers one JSON object; "outcome" says which:
--   in-flight  another transaction holds the Idempotency-Key's lock (nothing was done);
--   stored     the key has an answer: "request_hash", "response" (null for a held redemption) and
--              "redemption_id" (of a held one);
--   refused    a check failed before anything was written: "code" and the figures its problem names
--              ("stock"; "limit" and "taken"; "points" and "available_mg");
--   held       written: "id" of the redemption, "reward", "provider_code", "points" and "milligrams"
--              per issuer code.
-- Refusals a concurrent change can cause after the writes began raise instead, so the caller's
-- transaction rolls back and stores nothing: the ledger's LG004 (a lot was swept since it was read:
-- insufficient points), CH002 (the last unit of stock was taken) and CH003 (a refusal was stored under
-- the key meanwhile: that answer stands).
CREATE FUNCTION settlement_redemption_hold(
    p_person bigint,
    p_owner_lock bigint,
    p_request_lock bigint,      -- NULL with p_key: a hold without an Idempotency-Key
    p_key text,
    p_reward text,
    p_quantity integer,
    p_now timestamptz,
    p_today date,
    p_public_id text,
    p_hold_expires_at timestamptz,
    p_request_hash text,        -- the key's request hash (with p_key)
    p_event_type text,          -- the provider's webhook: its type and CloudEvents source
    p_event_source text
) RETURNS jsonb LANGUAGE plpgsql
-- Plan each statement once per connection: PL/pgSQL otherwise kept planning them afresh for every call
-- (custom plans), about a fifth of the call. Every statement reads by key or by the person's index.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    stored record;
    offer record;
    units_taken bigint;
    points bigint;
    need bigint;                -- milligrams
    lots_total bigint;
    owed bigint;
    redemption bigint;
    lot_ids bigint[];
    lot_issuers bigint[];
    lot_expiries date[];
    takes bigint[];
    hold_issuers bigint[];
    hold_amounts bigint[];
    hold_accounts bigint[];
    debits bigint[];            -- minus takes
    transfer bigint;
    milligrams jsonb;
BEGIN
    -- Each statement below reads what was committed when it started (READ COMMITTED): after the locks.
    IF p_key IS NOT NULL THEN
        IF NOT pg_try_advisory_xact_lock(p_request_lock) THEN
            RETURN jsonb_build_object('outcome', 'in-flight');
        END IF;
    END IF;
    PERFORM pg_advisory_xact_lock(p_owner_lock);
    IF p_key IS NOT NULL THEN
        SELECT r.request_hash, r.response, r.redemption_id INTO stored
          FROM settlement_redemptionrequest r
         WHERE r.person_id = p_person AND r.key = p_key;
        IF FOUND THEN
            RETURN jsonb_build_object('outcome', 'stored', 'request_hash', stored.request_hash,
                                      'response', stored.response, 'redemption_id', stored.redemption_id);
        END IF;
    END IF;

    SELECT r.id, r.code, r.points, r.stock, r.per_person_limit, r.active_from, r.active_until, r.provider_id,
           p.code AS provider_code, p.providing,
           (SELECT m.subject_sealed FROM wallets_subject_sealed(p_person, r.provider_id) m) AS sealed
      INTO offer
      FROM settlement_reward r, institutions_provider(r.provider_id) p
     WHERE r.code = p_reward;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'refused', 'code', 'reward-not-found');
    END IF;
    IF NOT ((offer.active_from IS NULL OR offer.active_from <= p_now)
            AND (offer.active_until IS NULL OR p_now < offer.active_until) AND offer.providing) THEN
        RETURN jsonb_build_object('outcome', 'refused', 'code', 'reward-unavailable');
    END IF;
    IF offer.stock IS NOT NULL AND offer.stock < p_quantity THEN
        RETURN jsonb_build_object('outcome', 'refused', 'code', 'out-of-stock', 'stock', offer.stock);
    END IF;
    IF offer.per_person_limit IS NOT NULL THEN
        SELECT COALESCE(SUM(x.quantity), 0) INTO units_taken
          FROM settlement_redemption x
         WHERE x.person_id = p_person AND x.reward_id = offer.id AND x.status IN ('pending', 'fulfilled');
        IF units_taken + p_quantity > offer.per_person_limit THEN
            RETURN jsonb_build_object('outcome', 'refused', 'code', 'redemption-limit-reached',
                                      'limit', offer.per_person_limit, 'taken', units_taken);
        END IF;
    END IF;
    points := offer.points::bigint * p_quantity;
    need := points * 1000;

    -- The person's lots and debts in one read through their index; the expiry is tested after the read
    -- (MATERIALIZED keeps it out): with it inside, the cached generic plan ANDed the person's index with
    -- the lots' expiry index, a scan of every live lot in the hub. Points owed back are not spendable.
    -- The lots go soonest-expiring first (then issuer, then account), each giving all it has until the
    -- need is met: "before" is what the lots ahead hold. The window's sort puts them in that order,
    -- and the aggregates take them as they come (an ORDER BY in each would sort them five times more).
    WITH mine AS MATERIALIZED (
        SELECT l.id, l.kind, l.issuer_id, l.expires_on, l.balance FROM ledger_person_lots(p_person) l
    ), lots AS (
        SELECT m.id, m.issuer_id, m.expires_on, m.balance,
               SUM(m.balance) OVER (ORDER BY m.expires_on, m.issuer_id, m.id) - m.balance AS before
          FROM mine m
         WHERE m.kind = 'wallet_lot' AND m.expires_on >= p_today
    )
    SELECT (SELECT COALESCE(-SUM(d.balance), 0) FROM mine d WHERE d.kind = 'debt'),
           COALESCE(SUM(l.balance), 0),
           array_agg(l.id) FILTER (WHERE l.before < need),
           array_agg(l.issuer_id) FILTER (WHERE l.before < need),
           array_agg(l.expires_on) FILTER (WHERE l.before < need),
           array_agg(LEAST(l.balance, need - l.before)) FILTER (WHERE l.before < need),
           array_agg(-LEAST(l.balance, need - l.before)) FILTER (WHERE l.before < need)
      INTO owed, lots_total, lot_ids, lot_issuers, lot_expiries, takes, debits
      FROM lots l;
    IF need > lots_total - owed THEN
        RETURN jsonb_build_object('outcome', 'refused', 'code', 'insufficient-points',
                                  'points', points, 'available_mg', GREATEST(lots_total - owed, 0));
    END IF;

    -- The redemption with its allocations, one per lot.
    WITH created AS (
        INSERT INTO settlement_redemption
               (public_id, person_id, reward_id, provider_id, quantity, points, status, created_at,
                hold_expires_at, resolved_by, voucher, reason)
        VALUES (p_public_id, p_person, offer.id, offer.provider_id, p_quantity, points, 'pending', p_now,
                p_hold_expires_at, '', '', '')
        RETURNING id
    ), allocated AS (
        INSERT INTO settlement_redemptionallocation (redemption_id, lot_id, issuer_id, expires_on, milligrams)
        SELECT created.id, u.lot, u.issuer, u.expires_on, u.mg
          FROM created, unnest(lot_ids, lot_issuers, lot_expiries, takes) AS u(lot, issuer, expires_on, mg)
    )
    SELECT created.id INTO redemption FROM created;

    -- What is taken per issuer, in issuer order, with the issuers' codes for the answer.
    SELECT array_agg(s.issuer), array_agg(s.mg), jsonb_object_agg(s.code, s.mg)
      INTO hold_issuers, hold_amounts, milligrams
      FROM (SELECT u.issuer, c.code, SUM(u.mg)::bigint AS mg
              FROM unnest(lot_issuers, takes) AS u(issuer, mg) JOIN institutions_codes(lot_issuers) c ON c.id = u.issuer
             GROUP BY u.issuer, c.code
             ORDER BY u.issuer) s;

    -- The ledger transfer: from the lots to one redemption_hold(redemption, issuer) account per issuer.
    hold_accounts := (ledger_accounts_ensure(
        array_fill('redemption_hold'::text, ARRAY[cardinality(hold_issuers)]), hold_issuers,
        array_fill(NULL::bigint, ARRAY[cardinality(hold_issuers)]), array_fill(''::text, ARRAY[cardinality(hold_issuers)]),
        array_fill(NULL::date, ARRAY[cardinality(hold_issuers)]), array_fill(redemption, ARRAY[cardinality(hold_issuers)]),
        array_fill(NULL::bigint, ARRAY[cardinality(hold_issuers)]), array_fill(NULL::bigint, ARRAY[cardinality(hold_issuers)]),
        p_now)).account_ids;
    transfer := (ledger_post(p_now, ARRAY['redemption:' || redemption || ':hold'], ARRAY['hold'],
                             jsonb_build_array(jsonb_build_object('redemption', p_public_id)),
                             array_fill(1, ARRAY[cardinality(lot_ids) + cardinality(hold_accounts)]),
                             lot_ids || hold_accounts, debits || hold_amounts)).transfer_ids[1];

    -- The stock last, so the reward row is locked only until the commit; the UPDATE re-checks it.
    IF offer.stock IS NOT NULL THEN
        UPDATE settlement_reward SET stock = stock - p_quantity WHERE id = offer.id AND stock >= p_quantity;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'reward % ran out', offer.code USING ERRCODE = 'CH002';
        END IF;
    END IF;

    -- The key's answer: the redemption it held, rebuilt from its rows when replayed.
    IF p_key IS NOT NULL THEN
        -- A refusal under this key may have been stored since the check above (refusals are stored
        -- after their own statement, without the key's lock): then that answer stands, and this hold
        -- rolls back (CH003; the caller replays the stored answer).
        INSERT INTO settlement_redemptionrequest (person_id, key, request_hash, response, redemption_id, created_at)
        VALUES (p_person, p_key, p_request_hash, NULL, redemption, p_now)
        ON CONFLICT (person_id, key) DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'key of person % answered meanwhile', p_person USING ERRCODE = 'CH003';
        END IF;
    END IF;

    -- The provider's webhook, its data as settlement.webhooks.redemption_requested_data writes it (compact
    -- JSON, keys in that order); the person's subject id at the provider stays sealed until it is sent.
    PERFORM institutions_outbox_enqueue(offer.provider_id, p_event_type, row_to_json(data), COALESCE(offer.sealed, ''),
                                        p_event_source, p_now)
       FROM (SELECT p_public_id AS redemption_id, offer.code AS reward, points AS points, p_quantity AS quantity,
                    NULL::text AS subject) AS data;

    RETURN jsonb_build_object('outcome', 'held', 'id', redemption, 'reward', offer.code,
                              'provider_code', offer.provider_code, 'points', points, 'milligrams', milligrams);
END $$;
