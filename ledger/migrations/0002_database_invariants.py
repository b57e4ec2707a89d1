"""The ledger's invariants, enforced by PostgreSQL itself (no-ops on SQLite, where services check them).

- A deferred constraint trigger: at commit, the postings of every transfer that gained postings sum to
  zero: points never appear or vanish. (That they sum to zero per issuer too is checked by the posting
  service and by ``ledger_check``.)
- Postings are append-only: UPDATE and DELETE are refused.
- Transfers are append-only except for being sealed: ``block_id`` may go from NULL to a block, once,
  with nothing else changing; a transfer is never inserted already sealed, nor deleted.
- Blocks are append-only. Accounts keep their identity: only ``balance`` may change; never deleted.

The CHECK constraints on balances and amounts live in the models (0001), so they hold on SQLite too.
TRUNCATE is left alone: it is how a test database is emptied between tests.
"""

from django.db import migrations

from clearinghouse.db import PostgresOnlySQL

FORWARD = r"""
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger is append-only: % on % refused (post a correcting transfer instead)', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END
$$;

CREATE FUNCTION ledger_transfer_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    total numeric;
BEGIN
    -- One index probe on ledger_posting(transfer_id). Kept to the one table on purpose: a join to the
    -- accounts (to check per issuer) lets the planner pick a hash join that scans every account per row.
    SELECT SUM(amount) INTO total FROM ledger_posting WHERE transfer_id = NEW.transfer_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger: the postings of transfer % sum to %, not zero', NEW.transfer_id, total
            USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_posting_transfer_balanced';
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER ledger_posting_transfer_balanced
    AFTER INSERT ON ledger_posting
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_transfer_balanced();

-- Balances are rewritten by every batch: room on each page keeps those updates HOT (no index writes).
ALTER TABLE ledger_account SET (fillfactor = 50);

CREATE TRIGGER ledger_posting_append_only
    BEFORE UPDATE OR DELETE ON ledger_posting
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

CREATE TRIGGER ledger_transfer_append_only
    BEFORE UPDATE ON ledger_transfer
    FOR EACH ROW
    WHEN (NOT (OLD.block_id IS NULL AND NEW.block_id IS NOT NULL
               AND NEW.id = OLD.id AND NEW.idempotency_key = OLD.idempotency_key AND NEW.kind = OLD.kind
               AND NEW.created_at = OLD.created_at AND NEW.metadata = OLD.metadata))
    EXECUTE FUNCTION ledger_refuse_change();

CREATE TRIGGER ledger_transfer_no_delete
    BEFORE DELETE ON ledger_transfer
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

CREATE TRIGGER ledger_transfer_born_unsealed
    BEFORE INSERT ON ledger_transfer
    FOR EACH ROW WHEN (NEW.block_id IS NOT NULL)
    EXECUTE FUNCTION ledger_refuse_change();

CREATE TRIGGER ledger_block_append_only
    BEFORE UPDATE OR DELETE ON ledger_block
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

CREATE TRIGGER ledger_account_identity_fixed
    BEFORE UPDATE ON ledger_account
    FOR EACH ROW
    WHEN ((NEW.id, NEW.kind, NEW.key, NEW.issuer_id, NEW.person_id, NEW.subject_ref, NEW.holder_institution_id,
           NEW.provider_id, NEW.redemption_id, NEW.expires_on, NEW.created_at)
          IS DISTINCT FROM
          (OLD.id, OLD.kind, OLD.key, OLD.issuer_id, OLD.person_id, OLD.subject_ref, OLD.holder_institution_id,
           OLD.provider_id, OLD.redemption_id, OLD.expires_on, OLD.created_at))
    EXECUTE FUNCTION ledger_refuse_change();

CREATE TRIGGER ledger_account_no_delete
    BEFORE DELETE ON ledger_account
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
"""

BACKWARD = r"""
DROP TRIGGER ledger_account_no_delete ON ledger_account;
DROP TRIGGER ledger_account_identity_fixed ON ledger_account;
DROP TRIGGER ledger_block_append_only ON ledger_block;
DROP TRIGGER ledger_transfer_born_unsealed ON ledger_transfer;
DROP TRIGGER ledger_transfer_no_delete ON ledger_transfer;
DROP TRIGGER ledger_transfer_append_only ON ledger_transfer;
DROP TRIGGER ledger_posting_append_only ON ledger_posting;
DROP TRIGGER ledger_posting_transfer_balanced ON ledger_posting;
DROP FUNCTION ledger_transfer_balanced();
DROP FUNCTION ledger_refuse_change();
ALTER TABLE ledger_account RESET (fillfactor);
"""


class Migration(migrations.Migration):
    dependencies = [("ledger", "0001_initial")]

    operations = [PostgresOnlySQL(FORWARD, BACKWARD)]
