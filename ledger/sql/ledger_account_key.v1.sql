-- ledger_account_key, version 1 (ledger migration 0004).
-- Frozen: a migration loads it. A change is a new version and a new migration (docs/decisions.md,
-- "SQL functions live in versioned files").
--
-- An account's natural identity as its unique key, the string ledger.services.AccountKey writes:
-- kind, then h=holder, s=subject, p=person, r=redemption, pv=provider (those the kind has), i=issuer,
-- e=expiry date. The ledger owns this format; SQL that names accounts goes through
-- ledger_accounts_ensure, which uses this. tests/ledger/test_posting_engines.py holds it equal to
-- AccountKey for every kind.
CREATE FUNCTION ledger_account_key(
    p_kind text,
    p_issuer bigint,
    p_person bigint,
    p_subject text,
    p_expires_on date,
    p_redemption bigint,
    p_holder bigint,
    p_provider bigint
) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE
RETURN p_kind
    || CASE WHEN p_holder IS NULL THEN '' ELSE ':h=' || p_holder END
    || CASE WHEN COALESCE(p_subject, '') = '' THEN '' ELSE ':s=' || p_subject END
    || CASE WHEN p_person IS NULL THEN '' ELSE ':p=' || p_person END
    || CASE WHEN p_redemption IS NULL THEN '' ELSE ':r=' || p_redemption END
    || CASE WHEN p_provider IS NULL THEN '' ELSE ':pv=' || p_provider END
    || ':i=' || p_issuer
    || CASE WHEN p_expires_on IS NULL THEN '' ELSE ':e=' || to_char(p_expires_on, 'YYYY-MM-DD') END;
