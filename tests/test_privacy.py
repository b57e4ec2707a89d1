"""The registry of a person's rights (clearinghouse.privacy): each app's part under its own name."""

from __future__ import annotations

import pytest

from clearinghouse import privacy


def test_a_name_is_taken_once(monkeypatch):
    monkeypatch.setattr(privacy, "_sections", {})
    monkeypatch.setattr(privacy, "_erasers", {})

    def first(person_id: int) -> list[int]:
        return [person_id]

    def second(person_id: int) -> None:
        return None

    privacy.export_section("things")(first)
    privacy.export_section("things")(first)  # the same part again (a module imported twice): fine
    with pytest.raises(RuntimeError, match="things is already registered"):
        privacy.export_section("things")(second)
    privacy.eraser("things")(second)  # erasers have names of their own
    assert privacy.export_sections(7) == {"things": [7]}
    assert privacy.registered() == (["things"], ["things"])
