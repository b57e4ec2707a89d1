"""The public standard page: every active scenario, its unit, the factor in force, from when, its source,
and every version of its factor."""

from __future__ import annotations

import re
from datetime import date, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from django.utils.html import escape

from methodology.models import FactorVersion, Scenario
from methodology.selectors import published_standard, standard_history
from methodology.services import standard_changed
from tests.portal.conftest import EN

pytestmark = pytest.mark.django_db


def test_anyone_sees_every_active_scenario_with_its_factor_date_and_source(client):
    response = client.get("/standard/", **EN)
    html = response.content.decode()
    assert response.status_code == 200
    published = published_standard()
    assert len(published) >= 10
    for scenario in published:
        assert f"<code>{scenario['code']}</code>" in html
        assert scenario["name"] in html
        assert escape(scenario["factor"]["source"]) in html
        assert f'<time datetime="{scenario["factor"]["valid_from"]}">' in html
    assert html.count('class="card scenario"') == len(published)


def test_a_new_version_shows_in_the_history_and_the_old_one_ends_the_day_before(client):
    metro = Scenario.objects.get(code="transit.metro")
    FactorVersion.objects.create(
        scenario=metro, grams_per_unit=Decimal("41.5"), valid_from=date(2025, 3, 1), source="Revised, 2025"
    )
    upcoming = timezone.localdate() + timedelta(days=40)
    FactorVersion.objects.create(
        scenario=metro, grams_per_unit=Decimal("40"), valid_from=upcoming, source="Next revision"
    )
    standard_changed()
    html = client.get("/standard/", **EN).content.decode()
    card = re.search(r"<code>transit\.metro</code>.*?</details>", html, re.DOTALL).group(0)  # type: ignore[union-attr]
    assert "41.5 g CO₂e per km</dd>" in card  # in force now
    assert "History: 3 versions" in card
    assert "From Jan. 1, 2021 to Feb. 28, 2025" in card
    assert re.search(r"41\.5 g CO₂e per km\s*<span class=\"tag tag--current\">In force</span>", card)
    assert re.search(r"40 g CO₂e per km\s*<span class=\"tag\">Upcoming</span>", card)


def test_the_history_selector_orders_versions_and_bounds_them():
    metro = Scenario.objects.get(code="transit.metro")
    FactorVersion.objects.create(
        scenario=metro, grams_per_unit=Decimal("41.5"), valid_from=date(2025, 3, 1), source="r"
    )
    standard_changed()
    before = next(s for s in standard_history(on=date(2024, 6, 1)) if s.code == "transit.metro")
    assert [v.valid_from for v in before.versions] == [date(2025, 3, 1), date(2021, 1, 1)]
    assert before.current is not None and before.current.grams_per_unit == Decimal("46.8")
    assert before.versions[0].upcoming and not before.versions[0].in_force
    assert before.versions[1].valid_to == date(2025, 2, 28) and before.versions[0].valid_to is None
    after = next(s for s in standard_history(on=date(2025, 3, 1)) if s.code == "transit.metro")
    assert after.current is not None and after.current.grams_per_unit == Decimal("41.5")


def test_an_inactive_scenario_is_not_published(client):
    Scenario.objects.filter(code="transit.metro").update(active=False)
    standard_changed()
    assert "<code>transit.metro</code>" not in client.get("/standard/").content.decode()
    assert all(s.code != "transit.metro" for s in standard_history())
