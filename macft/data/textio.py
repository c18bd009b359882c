"""Decode the user's text files (data, prompts): the one place that decides an encoding.

UTF-8 (with or without a byte-order mark) is read as it is. Anything else is either forced
with ``--encoding`` or detected:

1. a byte-order mark names UTF-8, UTF-16 or UTF-32;
2. UTF-16/32 without a mark shows as NUL bytes in every other (fourth) position, since JSON and
   CSV syntax is ASCII;
3. a head that is valid UTF-8 is UTF-8. A head that is *mostly* UTF-8 (more valid multi-byte
   characters than bad bytes) is UTF-8 with damaged bytes: that is refused, naming the line of
   the first bad byte, rather than guessed at;
4. otherwise charset-normalizer guesses (Shift-JIS/CP932 and EUC-JP from Excel and Windows
   tools are the usual cases), and the file is read with a one-line note naming the encoding.
   A guess that then fails further down is refused naming the line, the guess and the option.

Files are decoded as a stream, line by line, so a large file is never held twice.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, Location, MacftError

# Detection looks at the first bytes only; 256 KiB is plenty for a guess and costs ~10 ms.
HEAD_BYTES = 256 * 1024
# A chunk of streamed decoding; the position of a bad byte is found again afterwards.
CHUNK_CHARS = 1 << 16

# Detected names replaced by the superset their users mean: Excel's "Shift-JIS" is CP932
# (it adds ①, ㈱ and the NEC/IBM rows), and charset-normalizer reports EUC-JP as JIS X 0213.
PREFERRED = {
    "shift_jis": ("cp932", "shift_jis"),
    "shift_jis_2004": ("cp932", "shift_jis_2004"),
    "shift_jisx0213": ("cp932", "shift_jisx0213"),
    "euc_jis_2004": ("euc_jp", "euc_jis_2004"),
    "euc_jisx0213": ("euc_jp", "euc_jisx0213"),
    "ascii": ("utf_8",),
}
LABELS = {"utf_8": "UTF-8", "utf_8_sig": "UTF-8", "cp932": "CP932 (Windows Shift-JIS)",
          "shift_jis": "Shift-JIS", "euc_jp": "EUC-JP", "utf_16": "UTF-16", "utf_16_le": "UTF-16 LE",
          "utf_16_be": "UTF-16 BE", "utf_32": "UTF-32", "utf_32_le": "UTF-32 LE", "utf_32_be": "UTF-32 BE",
          "iso2022_jp": "ISO-2022-JP"}
EXAMPLES = "utf-8, cp932 (Shift-JIS), euc-jp, utf-16"


def codec_name(encoding: str) -> str:
    """Python's canonical codec name ("Shift-JIS" -> "shift_jis"); raises LookupError."""
    return codecs.lookup(encoding).name.replace("-", "_")


def encoding_problem(encoding: str) -> str | None:
    """Why ``encoding`` cannot be used (for the config check), or None."""
    if encoding == "auto":
        return None
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        return f"unknown encoding {encoding!r}; use auto (detect) or a codec such as {EXAMPLES}"
    if not getattr(info, "_is_text_encoding", True):
        return f"{encoding!r} is not a text encoding; use auto or one of {EXAMPLES}"
    return None


# JSON's \\ud800-style escapes produce these; they have no UTF-8 form, so no tokenizer takes them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """Index of the first unpaired surrogate in ``text`` (a broken JSON \\u escape), or None."""
    if text.isascii():
        return None
    m = _SURROGATE.search(text)
    return m.start() if m else None


def label(codec: str) -> str:
    return LABELS.get(codec, codec)


@dataclass
class TextFile:
    """A text file and the encoding it is read with."""

    path: Path
    codec: str  # a Python codec name
    detected: bool  # chosen by detection, and not UTF-8
    forced: bool = False  # given by the user
    option: str | None = "--encoding"  # the flag that forces an encoding, for hints

    @property
    def note(self) -> str | None:
        """One line for the user when the file was read in a detected, non-UTF-8 encoding."""
        if not self.detected:
            return None
        force = f"; if the text comes out garbled, pass {self.option} with the right one" if self.option else ""
        return f"{self.path} is not UTF-8: reading it as {label(self.codec)}, the encoding detected{force}."

    def lines(self) -> Iterator[tuple[int, str]]:
        """(1-based line number, line with its ending) for every line.

        Lines end at \\n, \\r\\n or \\r only (unlike ``str.splitlines``, which also splits at
        U+2028 and other characters that may sit inside a JSON string)."""
        n = 0
        try:
            with open(self.path, encoding=self.codec, newline="") as f:
                for line in f:
                    n += 1
                    if n == 1 and line.startswith("\ufeff"):  # a forced UTF-16-LE over a marked file
                        line = line[1:]
                    yield n, line
        except UnicodeError:  # UnicodeDecodeError, or "UTF-16 stream does not start with BOM"
            raise self._decode_error() from None

    def read(self) -> str:
        """The whole text, line ends made \\n (a byte-order mark removed)."""
        try:
            with open(self.path, encoding=self.codec) as f:
                return f.read().removeprefix("\ufeff")
        except UnicodeError:
            raise self._decode_error() from None

    def read_as(self) -> str:
        """A hint sentence for a parse error, naming the encoding when it is not plain UTF-8."""
        if not (self.forced or self.detected) or self.codec in ("utf_8", "utf_8_sig"):
            return ""
        how = f"given with {self.option}" if self.forced else "detected"
        other = f" If that is wrong, pass {self.option} with the right encoding." if self.option else ""
        return f" The file was read as {label(self.codec)} ({how}).{other}"

    def _decode_error(self) -> DataError:
        line, col, bad = find_bad_byte(self.path, self.codec)
        name = label(self.codec)
        at = f" at byte {col + 1} of the line" if col is not None else ""
        shown = f" ({' '.join(f'0x{b:02x}' for b in bad)})" if bad else ""
        if self.forced:
            msg = f"this line is not valid {name} (the encoding given with {self.option or '--encoding'}){at}{shown}"
        elif self.detected:
            msg = f"the file looked like {name} (detected from its start), but this line is not valid {name}{at}{shown}"
        else:
            msg = f"this line is not valid UTF-8{at}{shown}, although the file before it is"
        return DataError(Location(str(self.path), line), msg, hint=self._hint(line))

    def _hint(self, line: int | None) -> str:
        opt = self.option
        guess = _guess_line(self.path, line) if line is not None else None
        if guess in (self.codec, "utf_8", "utf_8_sig"):
            guess = None
        looks = ""
        if guess:
            looks = (f"That line looks like {label(guess)}: if the whole file is, pass {opt} "
                     f"{guess.replace('_', '-')}. " if opt else f"That line looks like {label(guess)}. ")
        if self.forced:
            if guess:
                return (f"That line looks like {label(guess)}: pass {opt} {guess.replace('_', '-')} if the "
                        f"whole file is, or {opt} auto to detect the encoding.")
            return f"Pass {opt} with the file's real encoding ({EXAMPLES}), or {opt} auto to detect it."
        if not self.detected:
            return (looks + "Otherwise fix or delete the damaged characters on that line, or re-save the "
                    "file as UTF-8 in your editor." if looks else
                    "Fix or delete the damaged characters on that line, or re-save the file as UTF-8 "
                    "in your editor" + (f"; if the file is in another encoding, pass {opt} ({EXAMPLES})."
                                        if opt else "."))
        return looks + (f"Pass {opt} with the file's real encoding ({EXAMPLES}), or re-save the file as "
                        "UTF-8." if opt else "Re-save the file as UTF-8.")


def open_text(path: str | Path, encoding: str = "auto", option: str | None = "--encoding") -> TextFile:
    """Decide how to decode ``path``: forced (``encoding`` is a codec) or detected ("auto").

    ``option`` names the flag that forces an encoding, for messages (None: there is none)."""
    p = Path(path)
    if encoding and encoding != "auto":
        try:
            codec = codec_name(encoding)
        except LookupError:
            raise MacftError(f"Unknown encoding {encoding!r} (given to {option or '--encoding'}).",
                             f"Use auto (detect) or a codec such as {EXAMPLES}.") from None
        if codec == "utf_8":
            codec = "utf_8_sig"  # a byte-order mark is never part of the text
        elif codec in ("utf_16", "utf_32"):
            # Python's UTF-16/32 stream decoders insist on a byte-order mark; without one, the
            # byte order shows in the NULs (little-endian, Windows' choice, otherwise)
            with open(p, "rb") as f:
                head = f.read(4096)
            boms = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) if codec == "utf_16" else (
                codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
            if not head.startswith(boms):
                found = _nul_layout(head)
                codec = found if found and found.startswith(codec) else codec + "_le"
        return TextFile(p, codec, False, True, option)
    with open(p, "rb") as f:
        head = f.read(HEAD_BYTES)
        whole = len(head) < HEAD_BYTES
    codec, detected = detect(head, whole)
    if codec is None:
        raise DataError(Location(str(p)), "the file is not UTF-8 and its encoding could not be recognised",
                        hint=(f"Pass {option} with its encoding ({EXAMPLES})" if option else
                              "Re-save the file as UTF-8") + ".")
    return TextFile(p, codec, detected, False, option)


def detect(head: bytes, whole: bool = True) -> tuple[str | None, bool]:
    """(codec, detected) for the first bytes of a file; ``whole``: ``head`` is the entire file.
    ``detected`` is False for UTF-8, which needs no note. (None, True): unrecognised."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf_8_sig", False
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf_32", True
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf_16", True
    nul = _nul_layout(head)
    if nul:
        return nul, True
    if not whole:
        head = _cut_at_line_end(head)
    try:
        head.decode("utf-8")
        return "utf_8_sig", False
    except UnicodeDecodeError:
        pass
    if _mostly_utf8(head):
        return "utf_8_sig", False  # damaged UTF-8: refused with the line of the first bad byte
    return _charset_guess(head), True


def _nul_layout(head: bytes) -> str | None:
    """UTF-16/32 without a byte-order mark: ASCII syntax leaves NULs at fixed positions."""
    sample = head[:4096]
    n = len(sample) - len(sample) % 4
    if n < 4 or b"\x00" not in sample:
        return None
    sample = sample[:n]
    at = [sample[i::4].count(0) / (n // 4) for i in range(4)]
    if at[1] > 0.9 and at[2] > 0.9 and at[3] > 0.9:
        return "utf_32_le"
    if at[0] > 0.9 and at[1] > 0.9 and at[2] > 0.9:
        return "utf_32_be"
    even = (at[0] + at[2]) / 2
    odd = (at[1] + at[3]) / 2
    if odd > 0.3 and even < 0.05:
        return "utf_16_le"
    if even > 0.3 and odd < 0.05:
        return "utf_16_be"
    return None


def _cut_at_line_end(head: bytes) -> bytes:
    """Drop a last, partial line (it may end inside a multi-byte character)."""
    cut = head.rfind(b"\n")
    return head[: cut + 1] if cut > 0 else head


_UTF8_MULTI = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")


def _mostly_utf8(head: bytes) -> bool:
    """More valid multi-byte UTF-8 characters than bytes that fit no UTF-8 character.

    Text in another encoding (CP932, EUC-JP, Latin-1) forms valid UTF-8 sequences only by
    chance; a UTF-8 file with a few damaged bytes is mostly valid ones."""
    valid = len(_UTF8_MULTI.findall(head))
    if valid == 0:
        return False
    bad = head.decode("utf-8", errors="replace").count("\ufffd") - head.decode("utf-8", "ignore").count("\ufffd")
    return valid >= 4 * bad


def _charset_guess(head: bytes) -> str | None:
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # pragma: no cover - a dependency of macft
        return None
    best = from_bytes(head).best()
    if best is None:
        return None
    try:
        found = codec_name(best.encoding)
    except LookupError:
        return None
    for codec in PREFERRED.get(found, (found,)):
        try:
            head.decode(codec)
            return codec_name(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    return found


def find_bad_byte(path: Path, codec: str) -> tuple[int | None, int | None, bytes]:
    """(line, byte column, the bad bytes) of the first byte that ``codec`` cannot decode."""
    if codec.startswith(("utf_16", "utf_32")):
        # newlines are several bytes here: decode the whole file (this runs only on errors)
        raw = path.read_bytes()
        try:
            raw.decode(codec)
        except UnicodeError as e:
            if not isinstance(e, UnicodeDecodeError):
                return 1, None, raw[:2]
            before = raw[: e.start].decode(codec, errors="replace")
            line = before.count("\n") + 1
            col = e.start - (len(before[: before.rfind("\n") + 1].encode(codec)) if "\n" in before else 0)
            return line, col, raw[e.start:e.end][:4]
        return None, None, b""
    # ASCII-compatible encodings: 0x0A is never part of a multi-byte character
    dec = codecs.getincrementaldecoder(codec)("strict")
    n = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                dec.decode(line)
            except UnicodeDecodeError as e:
                return n, max(e.start, 0), e.object[e.start:e.end][:4]
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return n, None, e.object[e.start:e.end][:4]
    return None, None, b""


def _guess_line(path: Path, line: int) -> str | None:
    """The encoding one line looks like, for the hint of a failed UTF-8 read."""
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if n == line:
                    if not raw or _mostly_utf8(raw):
                        return None
                    return _nul_layout(raw) or _charset_guess(raw[:HEAD_BYTES])
    except OSError:
        return None
    return None
