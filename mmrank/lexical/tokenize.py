"""Tokenization for lexical matching: any script, numbers with units, light plural stemming.

`tokenize(text) -> (tokens, units)`:
- text is NFKC-normalised and case-folded (full-width forms, ligatures and case variants become one form);
- words are runs of letters (with their combining marks) of any script: Latin, Cyrillic, Greek, Arabic,
  Hebrew, Devanagari, Hangul, ... Scripts written without spaces (Han, Hiragana, Katakana, Thai, Lao, Khmer,
  Myanmar) become overlapping character bigrams (a lone character stays a unigram), the usual CJK recipe;
- numbers keep their decimal point or fraction (`32.75`, `1/2`) and are tokens too;
- a number followed by a unit word becomes a unit token with the unit canonicalised (`3/4 in.`, `3/4"` and
  `3/4-inch` are all `3/4in`; `120-Volt` is `120v`); these are returned separately as `units`;
- a few English function words are dropped; Latin-script tokens of 4+ letters lose a plural ending
  (`brackets` -> `bracket`, `batteries` -> `battery`) when `stem`.
`TOKENIZER_VERSION` changes whenever any of this changes (it is part of the stored tokens' content hash).
"""
from __future__ import annotations

import re
import unicodedata

TOKENIZER_VERSION = "lex1"

_UNITS = {
    "in": "in", "inch": "in", "inches": "in", '"': "in", "''": "in", "ft": "ft", "feet": "ft", "foot": "ft",
    "'": "ft", "yd": "yd", "yard": "yd", "yards": "yd", "mm": "mm", "cm": "cm", "m": "m", "meter": "m",
    "meters": "m", "gal": "gal", "gallon": "gal", "gallons": "gal", "qt": "qt", "quart": "qt", "quarts": "qt",
    "oz": "oz", "ounce": "oz", "ounces": "oz", "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb",
    "kg": "kg", "g": "g", "l": "l", "liter": "l", "litre": "l", "ml": "ml", "v": "v", "volt": "v",
    "volts": "v", "w": "w", "watt": "w", "watts": "w", "a": "a", "amp": "a", "amps": "a", "ampere": "a",
    "mah": "mah", "btu": "btu", "gauge": "gauge", "ga": "gauge", "awg": "gauge", "psi": "psi", "gpm": "gpm",
    "gpf": "gpf", "cfm": "cfm", "rpm": "rpm", "hp": "hp", "k": "k", "lumen": "lumen", "lumens": "lumen",
    "sq": "sq", "cu": "cu", "pc": "pc", "pcs": "pc", "piece": "pc", "pieces": "pc", "pack": "pack",
    "pk": "pack", "count": "count", "ct": "count", "tb": "tb", "gb": "gb", "mb": "mb", "hz": "hz", "mp": "mp",
    "x": None,
}
_STOP = frozenset("a an and the of for with to by on or at from as is are be in x".split())
_NUMBER = r"\d+(?:[.,]\d+)?(?:/\d+)?"
_UNIT_WORDS = "|".join(sorted((re.escape(u) for u, c in _UNITS.items() if c), key=len, reverse=True))
_UNIT_RE = re.compile(rf"({_NUMBER})\s*-?\s*({_UNIT_WORDS})(?![^\W_])")
_MARKS = "".join(re.escape(chr(c)) for c in range(0x300, 0x10000) if unicodedata.category(chr(c)).startswith("M"))
_TOKEN_RE = re.compile(rf"{_NUMBER}|(?:[^\W\d_]|[{_MARKS}])+|\d+")  # letters of any script with their marks
_NO_SPACE = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F),
             (0x0E00, 0x0EFF), (0x1780, 0x17FF), (0x1000, 0x109F), (0x31F0, 0x31FF), (0xFF66, 0xFF9D))


def _no_space_script(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _NO_SPACE)


def normalize(text: str) -> str:
    """NFKC + casefold; typographic quotes and the inch/foot primes become ASCII quotes."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return t.replace("\u2033", '"').replace("\u2032", "'").replace("\u201d", '"').replace("\u2019", "'")


def _stem(tok: str) -> str:
    if len(tok) < 4 or not tok.isascii() or not tok.isalpha():
        return tok
    if tok.endswith("ies") and len(tok) > 4:
        return tok[:-3] + "y"
    if tok.endswith(("ches", "shes", "sses", "xes", "zes")):
        return tok[:-2]
    if tok.endswith("s") and not tok.endswith(("ss", "us", "is")):
        return tok[:-1]
    return tok


def _split_no_space(word: str) -> list[str]:
    """A word mixing scripts: runs of no-space scripts become character bigrams, other runs stay whole."""
    out, run, other = [], [], []

    def flush_run():
        if len(run) == 1:
            out.append(run[0])
        out.extend(run[i] + run[i + 1] for i in range(len(run) - 1))
        run.clear()

    for ch in word:
        if _no_space_script(ch):
            if other:
                out.append("".join(other))
                other.clear()
            run.append(ch)
        else:
            if run:
                flush_run()
            other.append(ch)
    if run:
        flush_run()
    if other:
        out.append("".join(other))
    return out


def unit_tokens(norm: str) -> list[str]:
    """Number+unit tokens of normalised text (`3/4 in.` -> `3/4in`), decimal commas read as points."""
    out = []
    for num, unit in _UNIT_RE.findall(norm):
        out.append(num.replace(",", ".") + _UNITS[unit])
    return out


def tokenize(text: str | None, stem: bool = True) -> tuple[list[str], list[str]]:
    """(word tokens in order, number+unit tokens) of `text`; ([], []) for None or blank text."""
    if not text or not text.strip():
        return [], []
    norm = normalize(text)
    tokens: list[str] = []
    for m in _TOKEN_RE.finditer(norm):
        word = m.group(0)
        if word[0].isdigit():
            tokens.append(word.replace(",", "."))
            continue
        for piece in (_split_no_space(word) if any(_no_space_script(c) for c in word) else [word]):
            if piece in _STOP:
                continue
            tokens.append(_stem(piece) if stem else piece)
    return tokens, unit_tokens(norm)
