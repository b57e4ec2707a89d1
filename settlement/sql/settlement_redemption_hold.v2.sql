-- settlement_redemption_hold, version 2 (settlement migration 0007); superseded by version 3.
-- Frozen: a migration loads it. A change to the function is a new version and a new migration
-- (docs/decisions.md, "SQL functions live in versioned files").
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
    p_message_id text,          -- the webhook: its id, type, and CloudEvent text up to its data
    p_event_type text,
    p_event_head text
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
    transfer bigint;
    lot_ids bigint[];
    lot_issuers bigint[];
    lot_expiries date[];
    takes bigint[];
    hold_issuers bigint[];
    hold_amounts bigint[];
    short_lots bigint;
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
        SELECT r.request_hash, r.status_code, r.response, r.redemption_id INTO stored
          FROM settlement_redemptionrequest r
         WHERE r.person_id = p_person AND r.key = p_key;
        IF FOUND THEN
            RETURN jsonb_build_object('outcome', 'stored', 'request_hash', stored.request_hash,
                                      'status', stored.status_code, 'response', stored.response,
                                      'redemption_id', stored.redemption_id);
        END IF;
    END IF;

    SELECT r.id, r.code, r.points, r.stock, r.per_person_limit, r.active_from, r.active_until,
           p.id AS provider_id, p.code AS provider_code, p.status = 'active' AND p.is_provider AS provider_ok,
           (SELECT m.subject_sealed FROM wallets_membership m
             WHERE m.institution_id = p.id AND m.person_id = p_person AND m.unlinked_at IS NULL LIMIT 1) AS sealed
      INTO offer
      FROM settlement_reward r JOIN institutions_institution p ON p.id = r.provider_id
     WHERE r.code = p_reward;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'refused', 'code', 'reward-not-found');
    END IF;
    IF NOT ((offer.active_from IS NULL OR offer.active_from <= p_now)
            AND (offer.active_until IS NULL OR p_now < offer.active_until) AND offer.provider_ok) THEN
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

    -- The person's lots and debts in one read through their index, as spendable_lots reads them; the
    -- expiry is tested after the read (MATERIALIZED keeps it out): with it inside, the cached generic
    -- plan ANDed the person's index with the lots' expiry index, a scan of every live lot in the hub.
    -- Points owed back are not spendable. The lots go soonest-expiring first (then issuer, then
    -- account), each giving all it has until the need is met: "before" is what the lots ahead hold.
    WITH mine AS MATERIALIZED (
        SELECT a.id, a.kind, a.issuer_id, a.expires_on, a.balance
          FROM ledger_account a
         WHERE a.person_id = p_person AND (a.kind = 'wallet_lot' AND a.balance > 0 OR a.kind = 'debt' AND a.balance < 0)
    ), lots AS (
        SELECT m.id, m.issuer_id, m.expires_on, m.balance,
               SUM(m.balance) OVER (ORDER BY m.expires_on, m.issuer_id, m.id) - m.balance AS before
          FROM mine m
         WHERE m.kind = 'wallet_lot' AND m.expires_on >= p_today
    )
    SELECT (SELECT COALESCE(-SUM(d.balance), 0) FROM mine d WHERE d.kind = 'debt'),
           COALESCE(SUM(l.balance), 0),
           array_agg(l.id ORDER BY l.expires_on, l.issuer_id, l.id) FILTER (WHERE l.before < need),
           array_agg(l.issuer_id ORDER BY l.expires_on, l.issuer_id, l.id) FILTER (WHERE l.before < need),
           array_agg(l.expires_on ORDER BY l.expires_on, l.issuer_id, l.id) FILTER (WHERE l.before < need),
           array_agg(LEAST(l.balance, need - l.before) ORDER BY l.expires_on, l.issuer_id, l.id)
               FILTER (WHERE l.before < need)
      INTO owed, lots_total, lot_ids, lot_issuers, lot_expiries, takes
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

    -- What is taken per issuer, with the issuers' codes for the answer.
    SELECT array_agg(s.issuer ORDER BY s.issuer), array_agg(s.mg ORDER BY s.issuer), jsonb_object_agg(i.code, s.mg)
      INTO hold_issuers, hold_amounts, milligrams
      FROM (SELECT u.issuer, SUM(u.mg)::bigint AS mg FROM unnest(lot_issuers, takes) AS u(issuer, mg)
             GROUP BY u.issuer) s
      JOIN institutions_institution i ON i.id = s.issuer;

    -- The ledger transfer, as ledger.services.transfers_post writes one: lots to one redemption_hold
    -- account per issuer (keys as ledger.services.AccountKey writes them). The hold accounts are new,
    -- so they are written with their balance (what the postings put there); the lots' balances change
    -- below, under their locks.
    WITH holds AS (
        INSERT INTO ledger_account
               (kind, key, issuer_id, person_id, subject_ref, holder_institution_id, provider_id,
                redemption_id, expires_on, balance, created_at)
        SELECT 'redemption_hold', 'redemption_hold:r=' || redemption || ':i=' || u.issuer, u.issuer,
               NULL, '', NULL, NULL, redemption, NULL, u.mg, p_now
          FROM unnest(hold_issuers, hold_amounts) AS u(issuer, mg)
        RETURNING id, issuer_id, balance
    ), moved AS (
        INSERT INTO ledger_transfer (idempotency_key, kind, metadata, created_at)
        VALUES ('redemption:' || redemption || ':hold', 'hold', jsonb_build_object('redemption', p_public_id), p_now)
        RETURNING id
    ), posted AS (
        INSERT INTO ledger_posting (transfer_id, account_id, amount, created_at)
        SELECT moved.id, legs.account, legs.amount, p_now
          FROM moved,
               (SELECT u.id AS account, -u.mg AS amount, u.n AS n
                  FROM unnest(lot_ids, takes) WITH ORDINALITY AS u(id, mg, n)
                UNION ALL
                SELECT h.id, h.balance, cardinality(lot_ids) + row_number() OVER (ORDER BY h.issuer_id)
                  FROM holds h) legs
         ORDER BY legs.n
    )
    SELECT moved.id INTO transfer FROM moved;

    -- The lots, locked in id order and read again under the lock. Counted by an aggregate over the
    -- locking subquery, not filtered by a WHERE around it: a WHERE could be pushed into the subquery,
    -- and then lock only the rows it keeps, tested before the lock.
    SELECT count(*) FILTER (WHERE locked.balance < locked.mg) INTO short_lots
      FROM (SELECT a.balance, u.mg
              FROM ledger_account a JOIN unnest(lot_ids, takes) AS u(id, mg) ON u.id = a.id
             ORDER BY a.id
               FOR NO KEY UPDATE OF a) locked;
    IF short_lots > 0 THEN
        RAISE EXCEPTION 'a lot of person % was spent or swept since it was read', p_person USING ERRCODE = 'CH001';
    END IF;
    UPDATE ledger_account a SET balance = a.balance - u.mg
      FROM unnest(lot_ids, takes) AS u(id, mg)
     WHERE a.id = u.id;

    -- The stock last, so the reward row is locked only until the commit; the UPDATE re-checks it.
    IF offer.stock IS NOT NULL THEN
        UPDATE settlement_reward SET stock = stock - p_quantity WHERE id = offer.id AND stock >= p_quantity;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'reward % ran out', offer.code USING ERRCODE = 'CH002';
        END IF;
    END IF;

    -- The key's answer: a 201's is the redemption as held, rebuilt from its rows when replayed.
    IF p_key IS NOT NULL THEN
        -- A refusal under this key may have been stored since the check above (refusals are stored
        -- after their own statement, without the key's lock): then that answer stands, and this hold
        -- rolls back (CH003; the caller replays the stored answer).
        INSERT INTO settlement_redemptionrequest
               (person_id, key, request_hash, status_code, response, redemption_id, created_at)
        VALUES (p_person, p_key, p_request_hash, 201, NULL, redemption, p_now)
        ON CONFLICT (person_id, key) DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'key of person % answered meanwhile', p_person USING ERRCODE = 'CH003';
        END IF;
    END IF;

    -- The provider's webhook, its data as settlement.services._requested_data writes it; the person's
    -- subject id at the provider stays sealed until the message is sent (institutions.outbox.outbox_body).
    INSERT INTO institutions_outboxmessage
           (institution_id, message_id, type, body, subject_sealed, status, attempts, next_attempt_at,
            last_status_code, last_error, created_at, delivered_at)
    VALUES (offer.provider_id, p_message_id, p_event_type,
            p_event_head || format('{"redemption_id":%s,"reward":%s,"points":%s,"quantity":%s,"subject":null}}',
                                   to_json(p_public_id), to_json(offer.code), points, p_quantity),
            COALESCE(offer.sealed, ''), 'pending', 0, p_now, NULL, '', p_now, NULL);

    RETURN jsonb_build_object('outcome', 'held', 'id', redemption, 'reward', offer.code,
                              'provider_code', offer.provider_code, 'points', points, 'milligrams', milligrams);
END $$;
