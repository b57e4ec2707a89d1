"""The books in the admin: readable, never writable; a block page verifies that block."""

from __future__ import annotations

import pytest
from django.core.cache import cache

from clearinghouse.keys import hub_signer
from ledger.models import Account, Block, Transfer
from ledger.services import blocks_seal, transfers_post
from tests.ledger.conftest import credit, wallet_lot

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client, django_user_model):
    user = django_user_model.objects.create_superuser("op", password="op-password-123")
    client.force_login(user)
    return client


@pytest.fixture
def books():
    lot = wallet_lot(1, issuer=1)
    transfers_post(transfers=[credit("activity:1", issuer=1, lot=lot, amount=1234)])
    block = blocks_seal(signer=hub_signer())
    assert block is not None
    cache.delete(f"ledger:block-status:{block.hash}")
    return block


def test_pages_load_read_only(operator, books):
    account = Account.objects.get(kind="wallet_lot")
    transfer = Transfer.objects.get()
    for url in (
        "/admin/ledger/account/",
        "/admin/ledger/account/?kind__exact=wallet_lot",
        f"/admin/ledger/account/{account.pk}/change/",
        "/admin/ledger/transfer/",
        f"/admin/ledger/transfer/{transfer.pk}/change/",
        "/admin/ledger/block/",
    ):
        page = operator.get(url)
        assert page.status_code == 200, url
        assert b'name="_save"' not in page.content, url
    assert b"1.234 g" in operator.get("/admin/ledger/account/").content
    assert b"wallet_lot:p=1:i=1:e=2028-11-30" in operator.get(f"/admin/ledger/transfer/{transfer.pk}/change/").content
    for url in ("/admin/ledger/account/add/", f"/admin/ledger/account/{account.pk}/delete/"):
        assert operator.get(url).status_code == 403
    assert operator.post(f"/admin/ledger/account/{account.pk}/change/", {"balance": "0"}).status_code == 403
    assert Account.objects.get(pk=account.pk).balance == 1234


def test_block_page_verifies_and_the_list_remembers(operator, books):
    assert b"not verified" in operator.get("/admin/ledger/block/").content
    page = operator.get(f"/admin/ledger/block/{books.pk}/change/")
    assert page.status_code == 200
    assert b"ok: 2 postings recomputed" in page.content
    assert b"not verified" not in operator.get("/admin/ledger/block/").content
    assert Block.objects.count() == 1
