"""How tokens are shown to people: the one place the CLI, the web API, labels and search get token text from.

Vocabulary strings carry tokenizer markup: SentencePiece's "▁" word start, GPT-2's byte-level "Ġ" / "Ċ",
and byte-fallback pieces ("<0xC2>", "<0xA0>") for characters outside the vocabulary. People see the text
those stand for, never the markup:

    token_text("▁Paris")                   " Paris"
    token_text("<0x0A>")                   "\\n"          (an ASCII byte is its character)
    token_text("<0xC2>")                   "<0xC2>"       (one piece of a multi-byte character, alone)
    texts(["▁a", "<0xC2>", "<0xA0>"])      [" a", "", "\\xa0"]
                                           a run of byte pieces that spells UTF-8 characters becomes those
                                           characters, each shown at its last byte's position, where the
                                           model has read the whole character (the other positions show
                                           nothing, so the positions still line up with per-token activations)
    visible(" Paris")                      "␣Paris"       (a token shown on its own: edge whitespace made
                                                           visible, newlines as ↵, tabs as ⇥)
    describe("\\xa0")                      "no-break space" (a token named in a label: whitespace by name)

Text in running contexts keeps its real spaces; `visible` is for tokens listed one by one (promoted
tokens, the inspector's token column, label evidence).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_BYTE_ANYWHERE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# SentencePiece word start, GPT-2 byte-level space / newline / tab.
_MARKERS = {"▁": " ", "Ġ": " ", "Ċ": "\n", "ĉ": "\t"}
SPACE, NEWLINE, TAB = "␣", "↵", "⇥"


def token_text(tok: str | None, token_id: int | None = None) -> str:
    """A vocabulary string as the text it stands for ("▁Paris" → " Paris", "<0x0A>" → newline).

    A non-ASCII byte piece on its own cannot be a character and stays visible as "<0xNN>";
    use `texts` on a sequence to merge byte runs into characters.
    """
    if tok is None:
        return f"<unk:{token_id}>"
    for marker, text in _MARKERS.items():
        tok = tok.replace(marker, text)
    return _BYTE_ANYWHERE.sub(lambda m: _byte(int(m.group(1), 16)), tok)


def _byte(b: int) -> str:
    return chr(b) if b < 128 else f"<0x{b:02X}>"


def texts(tokens: Sequence[str | None]) -> list[str]:
    """Display text of each token of a sequence, byte-fallback runs merged into their characters."""
    out = [token_text(t) for t in tokens]
    i = 0
    while i < len(tokens):
        if _byte_value(tokens[i]) is None:
            i += 1
            continue
        j = i
        while j < len(tokens) and _byte_value(tokens[j]) is not None:
            j += 1
        _merge_run([_byte_value(t) for t in tokens[i:j]], out, i)  # type: ignore[misc]
        i = j
    return out


def _byte_value(tok: str | None) -> int | None:
    m = _BYTE_PIECE.match(tok) if tok else None
    return int(m.group(1), 16) if m else None


def _merge_run(values: list[int], out: list[str], start: int) -> None:
    """Decode one run of byte values in place: each complete UTF-8 character at its last byte's
    position, its earlier bytes empty; a byte that starts no valid character stays <0xNN>."""
    k = 0
    while k < len(values):
        n = _utf8_length(values[k])
        chunk = bytes(values[k:k + n]) if n else b""
        try:
            char = chunk.decode("utf-8") if n and len(chunk) == n else None
        except UnicodeDecodeError:
            char = None
        if char is None:
            out[start + k] = _byte(values[k])
            k += 1
            continue
        for c in range(n - 1):
            out[start + k + c] = ""
        out[start + k + n - 1] = char
        k += n


def _utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 character that starts with `lead` (0 for a continuation or invalid byte)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def one_line(text: str) -> str:
    """Text on one line: every line break shown as ↵."""
    return text.replace("\r\n", NEWLINE).replace("\n", NEWLINE).replace("\r", NEWLINE)


def visible(text: str) -> str:
    """A token shown on its own: leading/trailing spaces as ␣, newlines as ↵, tabs as ⇥ ("" stays "")."""
    text = one_line(text).replace("\t", TAB)
    core = text.strip(" ")
    if not core:
        return SPACE * len(text)
    lead = len(text) - len(text.lstrip(" "))
    trail = len(text) - len(text.rstrip(" "))
    return SPACE * lead + core + SPACE * trail


_SPACE_NAMES = {" ": "space", "\xa0": "no-break space", "\n": "newline", "\r": "carriage return", "\t": "tab"}


def describe(text: str) -> str:
    """A token named in a label: text with visible edges, whitespace-only tokens by name
    ("space", "2 newlines", "no-break space"), the empty first bytes of a merged character as such."""
    if text.strip():
        return visible(text)
    if not text:
        return "first byte(s) of a character"
    if len(set(text)) == 1:
        import unicodedata

        name = _SPACE_NAMES.get(text[0]) or unicodedata.name(text[0], "whitespace").lower()
        return name if len(text) == 1 else f"{len(text)} {name}s"
    return "whitespace"
