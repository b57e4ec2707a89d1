-- ledger_person_lots, version 1 (ledger migration 0004).
-- Frozen: a migration loads it. A change is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- A person's wallet lots that hold points and the debts they owe back (balance < 0), in no order,
-- read through the ledger's person index: for SQL of other apps that spends a person's points
-- (settlement_redemption_hold). Lapsed lots are included: the caller tests the expiry itself, after
-- reading (see that function). A plain SQL function, so the planner inlines it into the caller's query.
CREATE FUNCTION ledger_person_lots(p_person bigint)
RETURNS TABLE (id bigint, kind text, issuer_id bigint, expires_on date, balance bigint) LANGUAGE sql STABLE
AS $$
    SELECT a.id, a.kind, a.issuer_id, a.expires_on, a.balance
      FROM ledger_account a
     WHERE a.person_id = p_person
       AND (a.kind = 'wallet_lot' AND a.balance > 0 OR a.kind = 'debt' AND a.balance < 0)
$$;
