"""The books, read-only: operators look here; every change to the ledger is a transfer posted by a service."""

from __future__ import annotations

from django.contrib import admin
from django.utils.html import format_html

from clearinghouse.admin import ReadOnlyAdmin, ReadOnlyInline
from ledger.models import Account, Block, Posting, Transfer
from ledger.selectors import block_status_recall, block_status_remember, block_verify
from ledger.units import MG_PER_GRAM


def milligrams(value: int) -> str:
    """1,234,567 mg as ``1,234.567 g``: points are grams, the ledger keeps milligrams."""
    sign = "-" if value < 0 else ""
    grams, mg = divmod(abs(value), MG_PER_GRAM)
    return f"{sign}{grams:,}.{mg:03d} g"


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ("key", "kind", "issuer_id", "person_id", "expires_on", "balance_display", "created_at")
    list_filter = ("kind",)
    search_fields = ("=key", "=issuer_id", "=person_id")
    ordering = ("-id",)
    show_full_result_count = False

    @admin.display(description="balance", ordering="balance")
    def balance_display(self, obj: Account) -> str:
        return milligrams(obj.balance)


class PostingInline(ReadOnlyInline):
    model = Posting
    fields = ("id", "account", "amount", "created_at")
    readonly_fields = fields
    ordering = ("id",)
    list_select_related = ("account",)


@admin.register(Transfer)
class TransferAdmin(ReadOnlyAdmin):
    list_display = ("idempotency_key", "kind", "created_at", "block")
    list_filter = ("kind",)
    search_fields = ("=idempotency_key",)
    list_select_related = ("block",)
    ordering = ("-id",)
    show_full_result_count = False
    inlines = (PostingInline,)


@admin.register(Block)
class BlockAdmin(ReadOnlyAdmin):
    """The list shows the last remembered verdict (from ``ledger_verify`` or an opened block); opening a
    block verifies that block now."""

    list_display = ("height", "entry_count", "transfer_count", "created_at", "key_id", "last_verification")
    ordering = ("-height",)
    readonly_fields = ("verification",)

    @admin.display(description="verification")
    def last_verification(self, obj: Block) -> str:
        status = block_status_recall(block=obj)
        if status is None:
            return "not verified"
        return f"{'ok' if status['ok'] else 'BROKEN'} ({status['at'][:19]})"

    @admin.display(description="verification now")
    def verification(self, obj: Block) -> str:
        problems, postings = block_verify(block=obj)
        block_status_remember(block=obj, problems=problems)
        if not problems:
            return format_html("ok: {} postings recomputed, chain and signature verified", postings)
        return format_html("<strong>BROKEN</strong>: {}", "; ".join(str(p) for p in problems))
