"""Card data detection and redaction for raw payload text.

The ingest edge scans every payload's raw text *before* JSON parsing, so even
malformed input that carries a card number is caught and redacted. What counts
as card data (DESIGN.md, principle 4):

- a card number: 13-19 digits, optionally grouped by single spaces or dashes,
  passing the Luhn check, not part of a longer number (digits right after a
  decimal point are a fraction, not a card number) and not starting with 0
  (ISO/IEC 7812 issues no card under major industry identifier 0);
- magnetic stripe track 1 (``%B<pan>^<name>^<yymm>...?``) and track 2
  (``;<pan>=<yymm>...?``) data;
- a JSON key named like a CVV, a card number or track data (``cvv``, ``cvc2``,
  ``pan``, ``card_number``, ``track2``, ...) holding a value.

Scanning is two-stage. A byte-level pre-filter (an ASCII encode, one
``bytes.translate``, ``bytes.find`` and one small regex: a few microseconds for a
telemetry payload) finds the places that could hold card data; only those go
through the exact regexes and the Luhn check.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator

__all__ = [
    "PAN_MARK",
    "REDACTED_MARK",
    "TRACK_MARK",
    "find_card_data",
    "identifier_runs",
    "luhn_valid",
    "redact",
]

PAN_MARK = "[REDACTED-PAN]"
TRACK_MARK = "[REDACTED-TRACK]"
REDACTED_MARK = "[REDACTED]"

_MIN_PAN, _MAX_PAN = 13, 19

# A maximal run of >= 13 digits with single separators; not a fraction's digits ("1.234...").
_PAN_RUN = re.compile(r"(?<![0-9])(?<![0-9]\.)[0-9](?:[ -]?[0-9]){12,}")
_GROUP = re.compile(r"[0-9]+")
_TRACK2 = re.compile(r";?(?<![0-9])[0-9]{12,19}[=Dd][0-9]{4}[0-9]*\??")
_TRACK1 = re.compile(r"%?[Bb]?(?<![0-9])[0-9]{12,19}\^[^^\"\n]{0,26}\^[0-9]{4}[^?\"\n]{0,80}\??")

_CVV_KEYS = r"cvv2?|cvc2?|cid|csc"
_PAN_KEYS = r"pan|card[_-]?(?:number|num|no)|primary[_-]?account[_-]?number"
_TRACK_KEYS = r"track[_-]?(?:1|2|data)"
# ASCII-only case folding, like the pre-filter's bytes.lower().
_KEY_VALUE = re.compile(
    r"(?P<prefix>\"(?P<key>"
    + "|".join((_CVV_KEYS, _PAN_KEYS, _TRACK_KEYS))
    + r")\"\s*:\s*)(?P<value>\"(?:[^\"\\]|\\.)+\"|-?[0-9][0-9.eE+-]*)",
    re.IGNORECASE | re.ASCII,
)
_REDACTED_VALUE = f'"{REDACTED_MARK}"'
_CVV_KEY = re.compile(_CVV_KEYS, re.IGNORECASE | re.ASCII)
_PAN_KEY = re.compile(_PAN_KEYS, re.IGNORECASE | re.ASCII)

# Pre-filter. In the byte signature digits and separators become "0", the track markers
# keep a symbol and everything else is "x": every card number or track lies inside a run
# of >= 12 "0"s, and a track's run ends at its field separator.
_SIGNATURE = bytearray(b"x" * 256)
for _byte in b"0123456789 -":
    _SIGNATURE[_byte] = ord("0")
for _byte, _mark in zip(b"=Dd^", b"=DD^", strict=True):
    _SIGNATURE[_byte] = _mark
_SIG_TABLE = bytes(_SIGNATURE)
_ZEROS12 = b"0" * 12
_TRACK_SEPARATORS = frozenset((b"=", b"D", b"^"))
_ZEROS = re.compile(rb"0+")
_MAYBE_KEY = re.compile(rb'"(?:c(?:v[vc]|id"|sc"|ard[_-]?n)|pan"|primary|track)')

_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def luhn_valid(digits: str) -> bool:
    """True if the ASCII digit string passes the Luhn (mod 10) check."""
    odd = sum(ord(c) - 48 for c in digits[-1::-2])
    even = sum(_DOUBLED[ord(c) - 48] for c in digits[-2::-2])
    return (odd + even) % 10 == 0


def _windows(raw: bytes) -> tuple[list[tuple[int, int]], bool]:
    """Spans of the text that may hold a card number, and whether a track may be present.

    ``raw`` is the text from ``_encode``: one byte per character, so offsets carry over.
    """
    sig = raw.translate(_SIG_TABLE)
    spans: list[tuple[int, int]] = []
    tracks = False
    start = sig.find(_ZEROS12)
    while start != -1:
        run = _ZEROS.match(sig, start)
        end = run.end() if run is not None else start + len(_ZEROS12)
        spans.append((start, end))
        # A track's card number ends right at its separator: "=" or "D" (track 2), "^" (track 1).
        tracks = tracks or sig[end : end + 1] in _TRACK_SEPARATORS
        start = sig.find(_ZEROS12, end)
    return spans, tracks


def _pan_spans(
    text: str, ignore: Collection[str], windows: list[tuple[int, int]]
) -> Iterator[tuple[int, int, int]]:
    """(start, end, digit count) of each card number inside ``windows`` of ``text``, in order."""
    for window_start, window_end in windows:
        for run in _PAN_RUN.finditer(text, window_start, window_end):
            if run.group() not in ignore:
                yield from _pans_in_run(text, run.start(), run.group(), ignore)


def _pans_in_run(
    text: str, base: int, run: str, ignore: Collection[str]
) -> Iterator[tuple[int, int, int]]:
    # A run may hold more than a card number ("tel 555 4111 1111 1111 1111"): try every
    # sequence of whole digit groups of card-number length, the longest first from each start.
    groups = [(base + g.start(), base + g.end()) for g in _GROUP.finditer(run)]
    i = 0
    while i < len(groups):
        found: tuple[int, int] | None = None
        count = 0
        for j in range(i, len(groups)):
            count += groups[j][1] - groups[j][0]
            if count > _MAX_PAN:
                break
            if count >= _MIN_PAN:
                candidate = text[groups[i][0] : groups[j][1]]
                digits = candidate.replace(" ", "").replace("-", "")
                if digits[0] != "0" and candidate not in ignore and luhn_valid(digits):
                    found = (j, count)
        if found is None:
            i += 1
            continue
        j, count = found
        yield groups[i][0], groups[j][1], count
        i = j + 1


def identifier_runs(*identifiers: str) -> frozenset[str]:
    """The card-number-like digit runs inside known identifiers, to pass as ``ignore``."""
    return frozenset(
        ident[start:end]
        for ident in identifiers
        for start, end, _count in _pan_spans(ident, (), _windows(_encode(ident))[0])
    )


def _encode(text: str) -> bytes:
    # Every non-ASCII character becomes one "?": card data is ASCII, and offsets stay the same.
    return text.encode("ascii", "replace")


def _maybe_key(raw: bytes) -> bool:
    return _MAYBE_KEY.search(raw.lower()) is not None


def find_card_data(text: str, *, ignore: Collection[str] = ()) -> str | None:
    """Describe the first card data in ``text`` ("a 16-digit card number"), or None.

    Never returns the data itself. ``ignore`` holds exact digit runs that are known
    identifiers (a numeric merchant id from the authenticated topic), not card numbers.
    """
    raw = _encode(text)
    windows, tracks = _windows(raw)
    if tracks:
        if _TRACK2.search(text) is not None:
            return "track 2 data"
        if _TRACK1.search(text) is not None:
            return "track 1 data"
    for _start, _end, count in _pan_spans(text, ignore, windows):
        return f"a {count}-digit card number"
    return _find_card_key(text) if _maybe_key(raw) else None


def _find_card_key(text: str) -> str | None:
    for match in _KEY_VALUE.finditer(text):
        if match.group("value") == _REDACTED_VALUE:
            continue
        name = match.group("key")
        if _CVV_KEY.fullmatch(name):
            return "a CVV field"
        return "a card number field" if _PAN_KEY.fullmatch(name) else "a track data field"
    return None


def redact(text: str, *, ignore: Collection[str] = ()) -> str:
    """``text`` with every card number, track data and card-field value replaced by a marker.

    Card numbers become ``[REDACTED-PAN]``, track data ``[REDACTED-TRACK]`` and the value
    of a CVV / card number / track JSON key ``"[REDACTED]"``; everything else is kept, so
    ``find_card_data(redact(text))`` is always None.
    """
    raw = _encode(text)
    if _maybe_key(raw):
        text = _KEY_VALUE.sub(lambda m: m.group("prefix") + _REDACTED_VALUE, text)
        raw = _encode(text)
    windows, tracks = _windows(raw)
    if not windows:
        return text
    if tracks:
        text = _TRACK1.sub(TRACK_MARK, _TRACK2.sub(TRACK_MARK, text))
        windows, _ = _windows(_encode(text))
    parts: list[str] = []
    last = 0
    for start, end, _count in _pan_spans(text, ignore, windows):
        parts.append(text[last:start])
        parts.append(PAN_MARK)
        last = end
    if not parts:
        return text
    parts.append(text[last:])
    return "".join(parts)
