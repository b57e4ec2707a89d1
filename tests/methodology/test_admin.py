from decimal import Decimal

import pytest

from methodology.models import FactorVersion, Scenario
from methodology.standard import current_standard

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client, django_user_model):
    user = django_user_model.objects.create_superuser("op", password="op-password-123")
    client.force_login(user)
    return client


@pytest.mark.parametrize(
    "url",
    [
        "/admin/methodology/scenario/",
        "/admin/methodology/factorversion/",
        "/admin/methodology/actionmapping/",
        "/admin/methodology/cap/",
        "/admin/methodology/unitconversion/",
        "/admin/methodology/evidencetier/",
        "/admin/methodology/normalizedactivity/",
        "/admin/methodology/actionmapping/add/",
    ],
)
def test_pages_load(operator, url):
    assert operator.get(url).status_code == 200


def test_changed_factor_is_a_new_version(operator):
    metro = Scenario.objects.get(code="transit.metro")
    page = operator.get(f"/admin/methodology/scenario/{metro.pk}/change/")
    assert page.status_code == 200
    old = FactorVersion.objects.get(scenario=metro)
    # The existing version is shown read-only: no editable grams field for it.
    assert f'name="factor_versions-0-grams_per_unit" value="{old.grams_per_unit}"' not in page.content.decode()
    response = operator.post(
        f"/admin/methodology/scenario/{metro.pk}/change/",
        {
            "name": metro.name,
            "description": "",
            "active": "on",
            "factor_versions-TOTAL_FORMS": "2",
            "factor_versions-INITIAL_FORMS": "1",
            "factor_versions-0-id": str(old.pk),
            "factor_versions-0-scenario": str(metro.pk),
            "factor_versions-1-scenario": str(metro.pk),
            "factor_versions-1-valid_from": "2027-01-01",
            "factor_versions-1-grams_per_unit": "44.1",
            "factor_versions-1-source": "Revised methodology, 2026",
            "caps-TOTAL_FORMS": "0",
            "caps-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    versions = list(
        FactorVersion.objects.filter(scenario=metro).order_by("valid_from").values_list("grams_per_unit", flat=True)
    )
    assert versions == [Decimal("46.8"), Decimal("44.1")]
    # Workers see the change on their next batch.
    assert [f.grams_per_unit for f in current_standard().scenarios["transit.metro"].factors] == versions


def test_factor_versions_cannot_be_edited_in_place(operator):
    version = FactorVersion.objects.order_by("pk").first()
    assert version is not None
    response = operator.post(
        f"/admin/methodology/factorversion/{version.pk}/change/",
        {"scenario": version.scenario_id, "valid_from": "2021-01-01", "grams_per_unit": "1", "source": "x"},
    )
    assert response.status_code == 403
    version.refresh_from_db()
    assert version.grams_per_unit != 1
