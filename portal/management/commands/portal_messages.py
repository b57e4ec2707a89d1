"""``manage.py portal_messages``: the persons' pages' translation catalogues, without GNU gettext.

Finds every translatable string of the portal (``{% translate %}``, ``{% blocktranslate %}`` in its
templates, ``gettext``/``gettext_lazy``/``ngettext``/``pgettext`` in its Python), adds the new ones to each
catalogue (``portal/locale/<locale>/LC_MESSAGES/django.po``) untranslated, drops the ones no longer used
(git keeps their translations), and compiles each catalogue into the ``django.mo`` beside it, which is
committed: a hub needs no gettext to run, and neither does a developer to translate. ``--check`` changes
nothing and fails when a catalogue misses a string, holds an unused one, has an untranslated or fuzzy
entry, or its ``.mo`` is not the compilation of its ``.po``. Needs polib (a development dependency).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation.template import templatize

PORTAL = Path(__file__).resolve().parent.parent.parent
LOCALE_DIR = PORTAL / "locale"
LOCALES = ("zh_Hans",)
PLURAL_FORMS = {"zh_Hans": "nplurals=1; plural=0;"}

# Function name -> what its leading string arguments are.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "gettext": ("msgid",),
    "gettext_lazy": ("msgid",),
    "_": ("msgid",),
    "ngettext": ("msgid", "msgid_plural"),
    "ngettext_lazy": ("msgid", "msgid_plural"),
    "pgettext": ("msgctxt", "msgid"),
    "pgettext_lazy": ("msgctxt", "msgid"),
    "npgettext": ("msgctxt", "msgid", "msgid_plural"),
    "npgettext_lazy": ("msgctxt", "msgid", "msgid_plural"),
}


@dataclass(frozen=True, slots=True)
class Message:
    msgid: str
    msgid_plural: str = ""
    msgctxt: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.msgctxt, self.msgid)


def _message(function: str, strings: list[str]) -> Message | None:
    roles = KEYWORDS[function]
    if len(strings) < len(roles):
        return None  # a call with a computed argument: nothing to extract
    values = dict(zip(roles, strings, strict=False))
    return Message(values["msgid"], values.get("msgid_plural", ""), values.get("msgctxt", ""))


def _from_python(source: str) -> Iterator[Message]:
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if name not in KEYWORDS:
            continue
        strings = []
        for argument in node.args:
            if not (isinstance(argument, ast.Constant) and isinstance(argument.value, str)):
                break
            strings.append(argument.value)
        message = _message(name, strings)
        if message is not None:
            yield message


_STRING = r"""u?(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_CALL = re.compile(rf"\b({'|'.join(KEYWORDS)})\(\s*((?:{_STRING}\s*,?\s*)+)", re.DOTALL)
_STRINGS = re.compile(_STRING, re.DOTALL)


def _from_template(source: str) -> Iterator[Message]:
    """What Django's makemessages hands xgettext: the template as gettext() calls among filler, whose
    string literals are read here as Python's."""
    for call in _CALL.finditer(templatize(source)):
        strings = [ast.literal_eval(literal) for literal in _STRINGS.findall(call.group(2))]
        message = _message(call.group(1), strings)
        if message is not None:
            yield message


def extract(root: Path = PORTAL) -> dict[tuple[str, str], tuple[Message, list[str]]]:
    """Every translatable string under ``root`` (templates and Python, migrations and locale left out),
    with where it occurs, by (context, msgid)."""
    found: dict[tuple[str, str], tuple[Message, list[str]]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".py", ".html", ".txt") or "locale" in path.parts or "migrations" in path.parts:
            continue
        if path.suffix == ".txt" and "templates" not in path.parts:
            continue
        source = path.read_text(encoding="utf-8")
        messages: Iterable[Message] = _from_python(source) if path.suffix == ".py" else _from_template(source)
        where = str(path.relative_to(root.parent))
        for message in messages:
            if message.key in found:
                known, places = found[message.key]
                if message.msgid_plural and known.msgid_plural and message.msgid_plural != known.msgid_plural:
                    raise CommandError(f"{message.msgid!r} has two plurals: {known.msgid_plural!r} and {where}")
                if where not in places:
                    places.append(where)
            else:
                found[message.key] = (message, [where])
    return found


def po_path(locale: str) -> Path:
    return LOCALE_DIR / locale / "LC_MESSAGES" / "django.po"


def load(locale: str) -> Any:
    import polib  # a development dependency: the hub itself only reads the compiled .mo

    path = po_path(locale)
    if path.exists():
        return polib.pofile(str(path), wrapwidth=0)
    catalogue = polib.POFile(wrapwidth=0)
    catalogue.metadata = {
        "Project-Id-Version": "carbon-clearinghouse portal",
        "Language": locale,
        "MIME-Version": "1.0",
        "Content-Type": "text/plain; charset=UTF-8",
        "Content-Transfer-Encoding": "8bit",
        "Plural-Forms": PLURAL_FORMS[locale],
    }
    return catalogue


def _entry_key(entry: Any) -> tuple[str, str]:
    return (entry.msgctxt or "", entry.msgid)


def problems(locale: str) -> list[str]:
    """Why the catalogue of ``locale`` is not ready to ship (empty when it is)."""
    import polib

    catalogue = load(locale)
    wanted = extract()
    live = [entry for entry in catalogue if not entry.obsolete]
    have = {_entry_key(entry): entry for entry in live}
    found = []
    found += [
        f"missing from the catalogue: {key[1]!r} ({', '.join(wanted[key][1])})" for key in wanted if key not in have
    ]
    found += [f"in the catalogue but used nowhere: {key[1]!r}" for key in have if key not in wanted]
    for key, entry in have.items():
        if key in wanted and wanted[key][0].msgid_plural != (entry.msgid_plural or ""):
            found.append(f"plural changed: {key[1]!r}")
        if "fuzzy" in entry.flags:
            found.append(f"fuzzy: {entry.msgid!r}")
        if not entry.translated():
            found.append(f"untranslated: {entry.msgid!r}")
    mo = po_path(locale).with_suffix(".mo")
    if not mo.exists():
        found.append(f"not compiled: {mo.name} is missing")
    else:
        compiled = {_entry_key(entry): entry for entry in polib.mofile(str(mo)) if entry.msgid}
        expected = {key: entry for key, entry in have.items() if entry.translated() and "fuzzy" not in entry.flags}
        if {key: _translation(entry) for key, entry in compiled.items()} != {
            key: _translation(entry) for key, entry in expected.items()
        }:
            found.append(f"stale: {mo.name} is not the compilation of django.po (run manage.py portal_messages)")
    return found


def _translation(entry: Any) -> tuple[str, ...]:
    if entry.msgid_plural:
        return (entry.msgid_plural, *(entry.msgstr_plural[index] for index in sorted(entry.msgstr_plural)))
    return (entry.msgstr,)


def update(locale: str) -> tuple[int, int]:
    """Add the strings ``locale``'s catalogue lacks, drop the unused ones, sort it, write it and compile
    it. Returns (added, dropped)."""
    import polib

    catalogue = load(locale)
    wanted = extract()
    entries = {_entry_key(entry): entry for entry in catalogue}
    added = dropped = 0
    for key, (message, places) in wanted.items():
        entry = entries.get(key)
        if entry is None:
            entry = polib.POEntry(msgid=message.msgid, msgctxt=message.msgctxt or None)
            if message.msgid_plural:
                entry.msgid_plural = message.msgid_plural
                entry.msgstr_plural = {0: ""}
            catalogue.append(entry)
            added += 1
        entry.occurrences = [(place, "") for place in places]
        if "%(" in message.msgid and "python-format" not in entry.flags:
            entry.flags.append("python-format")
    for key, entry in entries.items():
        if key not in wanted or entry.obsolete:
            catalogue.remove(entry)
            dropped += 1
    catalogue.sort(key=lambda entry: (entry.occurrences[:1], entry.msgctxt or "", entry.msgid))
    path = po_path(locale)
    path.parent.mkdir(parents=True, exist_ok=True)
    catalogue.save(str(path))
    compile_mo(locale)
    return added, dropped


def compile_mo(locale: str) -> Path:
    catalogue = load(locale)
    mo = po_path(locale).with_suffix(".mo")
    catalogue.save_as_mofile(str(mo))
    return mo


class Command(BaseCommand):
    help = "Update the portal's translation catalogues from its templates and code, and compile them (no gettext)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--check", action="store_true", help="Change nothing; fail if a catalogue is not ready.")

    def handle(self, *args: Any, check: bool = False, **options: Any) -> None:
        try:
            import polib  # noqa: F401
        except ImportError as error:
            raise CommandError("portal_messages needs polib: pip install -e '.[dev]'") from error
        failed = False
        for locale in LOCALES:
            if check:
                found = problems(locale)
                for problem in found:
                    self.stderr.write(f"{locale}: {problem}")
                failed = failed or bool(found)
            else:
                added, dropped = update(locale)
                self.stdout.write(f"{locale}: {added} new, {dropped} dropped; compiled {po_path(locale).parent}")
                for problem in problems(locale):
                    self.stdout.write(f"{locale}: {problem}")
        if failed:
            raise CommandError("The portal's catalogues are not ready (see above).")
