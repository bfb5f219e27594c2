"""A tiny document model and its Markdown and HTML writers.

The dossier is built once as :class:`Section` blocks of plain text; each writer escapes for its
own format, so a comment or a site name can never inject markup. ``clean`` (for example a PHI
redactor) is applied to every piece of text before it is written.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "Paragraph",
    "Subheading",
    "Bullets",
    "Table",
    "Figure",
    "Checklist",
    "Note",
    "Block",
    "Section",
    "to_markdown",
    "to_html",
    "to_plain",
]


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Subheading:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    name: str  # the PNG's file name, e.g. dice_per_round.png
    caption: str


@dataclass(frozen=True)
class Checklist:
    items: tuple[tuple[str, str, str], ...]  # (item, status, detail)


@dataclass(frozen=True)
class Note:
    """A signed note (a data scientist's comment): who, when, and free multi-line text."""

    author: str
    time: str
    text: str


Block = Paragraph | Subheading | Bullets | Table | Figure | Checklist | Note


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]


Clean = Callable[[str], str]


def _same(text: str) -> str:
    return text


# ---------------------------------------------------------------- Markdown

_MD_INLINE = re.compile(r"([\\`<>\[\]|])")
_MD_LINE_START = re.compile(r"^(\s*)([#>+\-*=])", re.MULTILINE)


def _md_inline(text: str, clean: Clean) -> str:
    """Text inside a line (cell, heading, list item): markup characters escaped, one line."""
    return " ".join(_MD_INLINE.sub(r"\\\1", clean(text)).split())


def _md(text: str, clean: Clean) -> str:
    """A paragraph: also no line may start a heading, quote, list or setext underline."""
    escaped = _MD_INLINE.sub(r"\\\1", clean(text))
    return _MD_LINE_START.sub(r"\1\\\2", escaped)


def _md_cell(text: str, clean: Clean) -> str:
    return _md_inline(text, clean) or " "


def to_markdown(
    title: str, sections: Iterable[Section], figure_dir: str = "plots", clean: Clean = _same
) -> str:
    """CommonMark: ``# title``, one ``## `` heading per section; figures link ``figure_dir/name``."""
    out = [f"# {_md_inline(title, clean)}", ""]
    for section in sections:
        out += [f"## {_md_inline(section.title, clean)}", ""]
        for block in section.blocks:
            out += _md_block(block, figure_dir, clean) + [""]
    return "\n".join(out).rstrip() + "\n"


def _md_block(block: Block, figure_dir: str, clean: Clean) -> list[str]:
    if isinstance(block, Paragraph):
        return [_md(block.text, clean)]
    if isinstance(block, Subheading):
        return [f"### {_md_inline(block.text, clean)}"]
    if isinstance(block, Bullets):
        return [f"- {_md_inline(item, clean)}" for item in block.items]
    if isinstance(block, Table):
        return _md_table(block.header, block.rows, clean)
    if isinstance(block, Checklist):
        return _md_table(("item", "status", "detail"), block.items, clean)
    if isinstance(block, Figure):
        return [f"![{_md_inline(block.caption, clean)}]({figure_dir}/{block.name})"]
    head = f"**{_md_cell(block.author, clean)}**, {_md_cell(block.time, clean)}:"
    lines = _md(block.text, clean).splitlines() or [""]
    return [f"> {head}", ">"] + [f"> {line}".rstrip() for line in lines]


def _md_table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]], clean: Clean) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h, clean) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md_cell(c, clean) for c in row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------- HTML

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:960px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:1.6em;border-bottom:2px solid #2b5797;padding-bottom:6px}
h2{font-size:1.25em;margin-top:1.8em;color:#2b5797}
h3{font-size:1.05em;margin-top:1.2em}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{border:1px solid #cfd5df;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0}
figure img{max-width:100%;border:1px solid #e1e5ec}
figcaption{font-size:.85em;color:#555}
.status{font-weight:bold;white-space:nowrap}
.PASS{color:#146c2e}.FAIL{color:#b3261e}.TO-CONFIRM,.WARN{color:#9a6700}
blockquote{border-left:4px solid #cfd5df;margin:8px 0;padding:4px 12px;background:#fafbfc}
blockquote .who{font-weight:bold}
blockquote .text{white-space:pre-wrap;margin-top:4px}
"""

_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?(e[-+]?\d+)?$")


def to_html(
    title: str, sections: Iterable[Section], images: Mapping[str, bytes], clean: Clean = _same
) -> str:
    """One self-contained page: inline stylesheet, PNGs as base64 data URIs, all text escaped.

    A :class:`Figure` whose PNG is not in ``images`` is left out.
    """

    def esc(text: str) -> str:
        return html.escape(clean(text), quote=True)

    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{esc(title)}</h1>",
    ]
    for section in sections:
        out.append("<section>")
        out.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            out.append(_html_block(block, images, esc))
        out.append("</section>")
    out += ["</main>", "</body>", "</html>"]
    return "\n".join(s for s in out if s) + "\n"


def _html_block(block: Block, images: Mapping[str, bytes], esc: Clean) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{esc(block.text)}</p>"
    if isinstance(block, Subheading):
        return f"<h3>{esc(block.text)}</h3>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
        body = "".join(
            "<tr>" + "".join(_td(cell, esc) for cell in row) + "</tr>" for row in block.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Checklist):
        rows = "".join(
            f"<tr><td>{esc(item)}</td>"
            f'<td class="status {esc(status.replace(" ", "-"))}">{esc(status)}</td>'
            f"<td>{esc(detail)}</td></tr>"
            for item, status, detail in block.items
        )
        return (
            "<table><thead><tr><th>item</th><th>status</th><th>detail</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    if isinstance(block, Figure):
        png = images.get(block.name)
        if png is None:
            return ""
        data = base64.b64encode(png).decode("ascii")
        return (
            f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(block.caption)}</figcaption></figure>"
        )
    return (
        f'<blockquote><div class="who">{esc(block.author)}, {esc(block.time)}</div>'
        f'<div class="text">{esc(block.text)}</div></blockquote>'
    )


def _td(cell: str, esc: Clean) -> str:
    return f'<td class="num">{esc(cell)}</td>' if _NUMBER.match(cell) else f"<td>{esc(cell)}</td>"


# ---------------------------------------------------------------- plain text


def to_plain(sections: Iterable[Section]) -> str:
    """Every piece of text of the sections, unescaped and uncleaned (for content checks)."""
    parts: list[str] = []
    for section in sections:
        parts.append(section.title)
        for block in section.blocks:
            if isinstance(block, (Paragraph, Subheading)):
                parts.append(block.text)
            elif isinstance(block, Bullets):
                parts += block.items
            elif isinstance(block, Table):
                parts += [" | ".join(block.header)] + [" | ".join(r) for r in block.rows]
            elif isinstance(block, Checklist):
                parts += [" | ".join(r) for r in block.items]
            elif isinstance(block, Figure):
                parts.append(block.caption)
            else:
                parts += [block.author, block.time, block.text]
    return "\n".join(parts)
