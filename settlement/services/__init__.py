"""Settlement writes, one module per concept:

- :mod:`~settlement.services.obligations`: the price in force and the gross obligations a capture makes;
- :mod:`~settlement.services.cycles`: cycles cut, netted, instructed, run, and moved as confirmations come;
- :mod:`~settlement.services.confirmations`: institutions' confirmations of their instructions;
- :mod:`~settlement.services.rewards`: what providers offer;
- :mod:`~settlement.services.idempotency`: the answers of ``POST /me/redemptions`` under an Idempotency-Key;
- :mod:`~settlement.services.holds`: redemption holds (engines: ``hold_database`` and ``hold_portable``);
- :mod:`~settlement.services.resolutions`: how a hold ends: fulfilled, rejected, voided or expired.

Every service is ``@transaction.atomic`` or says which transactions it opens; the states they move a
cycle through are described at the top of ``settlement/models.py``. The public names are here too.
"""

from settlement.services.confirmations import ConfirmationIn, confirmations_record
from settlement.services.cycles import (
    CycleRun,
    cycle_advance,
    cycle_cut,
    cycle_instruct,
    cycle_net,
    cycle_obligations,
    cycle_resend,
    cycle_run,
    cycle_transition,
    cycles_fail_undelivered,
    value_date_for,
)
from settlement.services.holds import redemption_hold, redemption_request
from settlement.services.idempotency import RedemptionAnswer, idempotency_key_clean, redemption_request_hash
from settlement.services.obligations import (
    ObligationSpec,
    obligations_for_redemption,
    obligations_record,
    price_in_force,
)
from settlement.services.resolutions import (
    Resolution,
    redemption_fulfil,
    redemption_locked,
    redemption_reject,
    redemption_void,
    redemptions_expire,
)
from settlement.services.rewards import reward_create

__all__ = [
    "ConfirmationIn",
    "CycleRun",
    "ObligationSpec",
    "RedemptionAnswer",
    "Resolution",
    "confirmations_record",
    "cycle_advance",
    "cycle_cut",
    "cycle_instruct",
    "cycle_net",
    "cycle_obligations",
    "cycle_resend",
    "cycle_run",
    "cycle_transition",
    "cycles_fail_undelivered",
    "idempotency_key_clean",
    "obligations_for_redemption",
    "obligations_record",
    "price_in_force",
    "redemption_fulfil",
    "redemption_hold",
    "redemption_locked",
    "redemption_reject",
    "redemption_request",
    "redemption_request_hash",
    "redemption_void",
    "redemptions_expire",
    "reward_create",
    "value_date_for",
]
