"""The webhooks settlement sends institutions (CONTRACT section 3): their types and their ``data``.

The edge (``institutions.outbox``) builds the CloudEvent around the data, stores it and delivers it;
settlement only says what happened.
"""

from __future__ import annotations

from typing import Any

from settlement.models import Instruction

INSTRUCTION_TYPE = "carbon.settlement.instruction"
REDEMPTION_REQUESTED = "carbon.redemption.requested"


def instruction_webhook_data(instruction: Instruction) -> dict[str, Any]:
    """Exactly the ``data`` fields of ``carbon.settlement.instruction`` (CONTRACT section 3)."""
    return {
        "instruction_id": instruction.instruction_id,
        "cycle_id": instruction.cycle_id,
        "direction": instruction.direction,
        "amount_minor": instruction.amount_minor,
        "currency": instruction.currency,
        "value_date": instruction.value_date.isoformat(),
        "statement_digest": instruction.statement_digest,
    }


def redemption_requested_data(*, public_id: str, reward: str, points: int, quantity: int) -> dict[str, Any]:
    """The data of ``carbon.redemption.requested`` as stored: ``subject``, the person's subject id at the
    provider if linked, is null here and filled in from the message's sealed copy when it is sent
    (``institutions.outbox.outbox_body``). The database hold writes the same keys in this order."""
    return {"redemption_id": public_id, "reward": reward, "points": points, "quantity": quantity, "subject": None}
