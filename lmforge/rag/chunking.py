"""Documents -> chunks for retrieval.

A document is split by its structure first (Markdown/RST headings, then blank-line paragraphs,
then sentences for a paragraph longer than the target), and the pieces are packed into chunks of
about `target` characters. Consecutive chunks of one section share `overlap` characters of
whole sentences, so a fact cut at a boundary is still whole in one of them. Every chunk keeps
its character span in the document and the heading it sits under.

Sizes are in characters: about 4 per token for English, so the default 1,000 fits the 256-token
window of all-MiniLM-L6-v2 with room to spare.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmforge.errors import LMForgeError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ".py", ".pyi", ".c", ".h", ".cpp", ".hpp", ".rs",
                 ".go", ".java", ".js", ".ts", ".sh", ".toml", ".yaml", ".yml", ".json", ".cfg", ".ini", ".tex",
                 ".csv", ".tsv", ".html", ".htm", ".xml"}

_HEADING = re.compile(r"^(#{1,6} .+|.+\n[=\-~^*]{3,}[ \t]*)$", re.M)  # "# Title" or an underlined RST title
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


@dataclass
class Chunk:
    text: str
    start: int  # character span [start, end) in the document's text
    end: int
    heading: str = ""


class _TextFromHTML(HTMLParser):
    """Visible text of an HTML page, with block elements as paragraph breaks."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "article",
              "table", "ul", "ol", "blockquote", "dt", "dd"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("#" * int(tag[1]) + " ")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def html_to_text(source: str) -> str:
    p = _TextFromHTML()
    p.feed(source)
    text = html.unescape("".join(p.parts))
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def pdf_support() -> bool:
    try:
        import pypdf  # noqa: F401
    except ImportError:
        return False
    return True


def read_pdf(path: Path) -> str:
    """A PDF's text layer, page by page (pages as paragraphs). Scanned pages have none."""
    if not pdf_support():
        raise LMForgeError(f"reading {path} needs the PDF extra: pip install 'lmforge[pdf]'")
    import logging

    import pypdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # damaged files become one clear error below
    try:
        reader = pypdf.PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise LMForgeError(f"{path} is an encrypted PDF; decrypt it first")
        pages = [(p.extract_text() or "").strip() for p in reader.pages]
    except LMForgeError:
        raise
    except Exception as e:  # pypdf raises many kinds for damaged files
        raise LMForgeError(f"{path} is not a readable PDF ({type(e).__name__}: {e})") from None
    text = "\n\n".join(p for p in pages if p)
    if not text:
        raise LMForgeError(f"{path} has no text layer (a scanned PDF?); nothing to index")
    return text


def read_document(path: Path) -> str:
    """The text of a file (HTML reduced to its visible text, PDF to its text layer). Binary or
    non-UTF-8 files are clear errors."""
    if Path(path).suffix.lower() == ".pdf":
        return read_pdf(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise LMForgeError(f"cannot read {path}: {e.strerror}") from None
    if b"\0" in raw[:8192]:
        raise LMForgeError(f"{path} looks binary, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{path} is not UTF-8 text (invalid byte at {e.start}); convert it first") from None
    text = text.replace("\r\n", "\n")
    if Path(path).suffix.lower() in (".html", ".htm"):
        text = html_to_text(text)
    return text


def _sections(text: str) -> list[tuple[int, int, str]]:
    """(start, end, heading) spans, cut before every heading line."""
    cuts = [m.start() for m in _HEADING.finditer(text)]
    bounds = sorted({0, *cuts, len(text)})
    out = []
    for a, b in zip(bounds, bounds[1:]):
        first = text[a:b].lstrip("\n").split("\n", 1)[0]
        heading = first.lstrip("#").strip() if a in cuts else ""
        out.append((a, b, heading[:200]))
    return out


def _pieces(text: str, a: int, b: int, target: int) -> list[tuple[int, int]]:
    """Paragraph spans within [a, b), with paragraphs longer than target cut into sentences
    (and a sentence longer than target cut at target)."""
    spans = []
    for m in re.finditer(r"\S(?:.*?\S)?(?=[ \t]*\n\s*\n|\s*\Z)", text[a:b], re.S):
        s, e = a + m.start(), a + m.end()
        if e - s <= target:
            spans.append((s, e))
            continue
        pos = s
        for sm in _SENTENCE_END.finditer(text, s, e):
            if sm.start() > pos:
                spans.extend(_hard_cut(pos, sm.start(), target))
            pos = sm.end()
        if pos < e:
            spans.extend(_hard_cut(pos, e, target))
    return spans


def _hard_cut(s: int, e: int, target: int) -> list[tuple[int, int]]:
    return [(i, min(e, i + target)) for i in range(s, e, target)]


def chunk_text(text: str, target: int = 1000, overlap: int = 150) -> list[Chunk]:
    """Structure-aware chunks of about `target` characters (see the module docstring)."""
    if target < 50:
        raise LMForgeError(f"chunk size must be at least 50 characters, got {target}")
    if not 0 <= overlap < target:
        raise LMForgeError(f"overlap must be between 0 and the chunk size, got {overlap}")
    chunks: list[Chunk] = []
    for a, b, heading in _sections(text):
        pieces = _pieces(text, a, b, target)
        i = 0
        while i < len(pieces):
            j = i
            while j + 1 < len(pieces) and pieces[j + 1][1] - pieces[i][0] <= target:
                j += 1
            s, e = pieces[i][0], pieces[j][1]
            chunks.append(Chunk(text[s:e], s, e, heading))
            if j + 1 >= len(pieces):
                break
            # the next chunk starts with the last pieces of this one that fit in the overlap
            k = j + 1
            while k - 1 > i and pieces[j][1] - pieces[k - 1][0] <= overlap:
                k -= 1
            i = k
    return chunks
