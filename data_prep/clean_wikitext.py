"""Wikitext markup -> plain text, with mwparserfromhell; also the redirect and disambiguation rules.

One parse per page: the node tree is walked once, so no part of a page is re-parsed or
re-serialised; the template names (the disambiguation signal) come from one regex pass over the raw
text, because the templates that mark disambiguation pages often sit in a "See also" section that is
cut before parsing. Parsing is the
hot spot (mwparserfromhell builds its tree in Python), so what is dropped anyway is cut out with linear
regexes before the parse: comments, <ref> elements and boilerplate sections -- about 40% of the raw
text of a typical article and 2.5x less parse time. Bold/italic quotes are not parsed into tags
(``skip_style_tags``) but removed as text.

What comes out: paragraphs (and list items) one per line separated by blank lines; headings as their
own paragraph, text only. Dropped: templates (except a few that only wrap visible text), <ref> and
other non-prose tags, tables, files/images/media, categories, interlanguage links, comments, HTML tag
markup (the text inside formatting tags stays), magic words, boilerplate sections (References, External
links, ...) and headings left with no text under them.

Disambiguation rule: a page is a disambiguation page when one of its templates is a disambiguation
template -- a name in ``DISAMBIGUATION_TEMPLATES`` or any name ending in " disambiguation" (Wikipedia's
family: {{hospital disambiguation}}, {{school disambiguation}}, ...) -- or its title ends in
"(disambiguation)". Set index articles ({{set index article}}, {{surname}}, {{given name}}, ...) are
kept: Wikipedia counts them as articles, not disambiguation pages (WP:SETINDEX).
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass

import mwparserfromhell
from mwparserfromhell.nodes import (
    Argument, Comment, ExternalLink, Heading, HTMLEntity, Tag, Template, Text, Wikilink,
)
from mwparserfromhell.wikicode import Wikicode

DISAMBIGUATION_TEMPLATES = frozenset({
    "disambiguation", "disambig", "disamb", "dab", "disambiguation page", "disambiguation cleanup",
    "hndis", "hndis-cleanup", "geodis", "numberdis", "letter-number combination disambiguation",
    "mathdab", "roaddis", "schooldis", "shipindex-dab",
})
_REDIRECT = re.compile(r"\s*#REDIRECT\b", re.IGNORECASE)
_DISAMBIG_TITLE = re.compile(r"\(disambiguation\)\s*$", re.IGNORECASE)
# Tags whose content is not prose of the article.
_DROP_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "ce", "score", "timeline", "imagemap",
    "syntaxhighlight", "source", "graph", "mapframe", "maplink", "templatedata", "templatestyles",
    "inputbox", "categorytree", "noinclude", "hiero", "section", "indicator",
})
_LINE_TAGS = frozenset({"li", "dt", "dd", "br", "p", "div", "tr", "hr", "blockquote", "poem"})
_MEDIA_NS = frozenset({"file", "image", "media", "category"})
_INTERWIKI = frozenset({
    "w", "wikipedia", "wikt", "wiktionary", "s", "wikisource", "b", "wikibooks", "q", "wikiquote", "n",
    "wikinews", "v", "wikiversity", "voy", "wikivoyage", "species", "wikispecies", "commons", "c", "d",
    "wikidata", "m", "meta", "mw", "mediawikiwiki", "foundation", "wmf",
})
_LANG_PREFIX = re.compile(r"^(?:[a-z]{2,3}(?:-[a-z0-9]+)*|simple)$")
_BOILERPLATE_SECTIONS = frozenset({
    "references", "external links", "see also", "notes", "further reading", "bibliography", "sources",
    "footnotes", "citations", "notes and references", "references and notes", "works cited",
})
_MAGIC = re.compile(r"__[A-Z]+__")
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
# A self-closing <ref .../>, or <ref ...> up to the first </ref> without crossing another <ref (so an
# unclosed <ref> cannot swallow the text up to a later reference).
_REF = re.compile(r"<ref\b[^>]*?/>|<ref(?:\s[^>]*)?>[^<]*(?:<(?!/?ref\b)[^<]*)*</ref\s*>", re.IGNORECASE)
_RAW_HEADING = re.compile(r"^(={1,6})[ \t]*(.+?)[ \t]*\1[ \t]*$", re.MULTILINE)
_QUOTES = re.compile(r"'{2,}")
# Tag markup the parser leaves as text when it is unbalanced in the source (a stray </blockquote>).
_STRAY_TAG = re.compile(r"</?([a-zA-Z][a-zA-Z0-9]*)(?:\s[^<>]*)?/?>")
_HTML_TAGS = frozenset(
    "abbr b bdi bdo big blockquote br caption center cite code dd del dfn div dl dt em font h1 h2 h3 h4 h5 h6 "
    "hr i ins kbd li mark nowiki ol onlyinclude includeonly noinclude p poem pre q rp rt ruby s samp small "
    "span strike strong sub sup table td th time tr tt u ul var wbr ref references gallery math".split()
)
_TEMPLATE_NAME = re.compile(r"\{\{(?!\{)\s*([^{}|\n]+?)\s*(?=[|}])")
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)|\[\s*\]")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_HEADING = "\x01"  # marks a heading line in the intermediate text: \x01<level><title>
# Templates that only wrap visible text: name -> which positional parameter is the text ({{lang-xx|...}} too).
_TEXT_TEMPLATES = {
    "nowrap": 0, "nobr": 0, "lang": 1, "transl": -1, "small": 0, "smaller": 0, "sic": -1, "audio": 1, "iast": 0,
}
_RANGE_WORDS = frozenset({"-", "\u2013", "to", "and", "or", "x", "by", "&", "to(-)", "and(-)", "+/-"})


@dataclass(frozen=True)
class CleanedPage:
    text: str
    disambiguation: bool


def is_redirect(raw: str) -> bool:
    """A page whose text starts with #REDIRECT (any case), as MediaWiki decides."""
    return bool(_REDIRECT.match(raw))


def template_name(name: str) -> str:
    """Normalise a template name as MediaWiki does for lookups: first letter case, underscores, spaces."""
    name = name.replace("_", " ").strip()
    if name.lower().startswith("template:"):
        name = name[9:].strip()
    return " ".join(name.split()).lower()


def is_disambiguation_template(name: str) -> bool:
    norm = template_name(name)
    return norm in DISAMBIGUATION_TEMPLATES or norm.endswith(" disambiguation")


def clean_wikitext(raw: str, title: str = "") -> CleanedPage:
    """Parse ``raw`` once and return its plain text and whether it is a disambiguation page."""
    raw = _COMMENT.sub("", raw)
    disambig = bool(_DISAMBIG_TITLE.search(title)) or any(
        is_disambiguation_template(name) for name in _TEMPLATE_NAME.findall(raw)
    )
    walker = _Walker()
    walker.walk(mwparserfromhell.parse(_prestrip(raw), skip_style_tags=True))
    return CleanedPage(_finish("".join(walker.out)), disambig)


def _prestrip(raw: str) -> str:
    """Cut references and boilerplate sections (up to the next heading of the same or a
    higher level) out of the raw wikitext, before the costly parse."""
    raw = _REF.sub("", raw)
    out, pos, skip_level = [], 0, 0
    for m in _RAW_HEADING.finditer(raw):
        level = len(m.group(1))
        if skip_level:
            if level > skip_level:
                continue
            pos, skip_level = m.start(), 0
        if _is_boilerplate(m.group(2)):
            out.append(raw[pos:m.start()])
            skip_level = level
    if not skip_level:
        out.append(raw[pos:])
    return "".join(out)


def _is_boilerplate(heading: str) -> bool:
    return heading.strip().lower().rstrip(".:").strip() in _BOILERPLATE_SECTIONS


class _Walker:
    def __init__(self) -> None:
        self.out: list[str] = []

    def walk(self, code: Wikicode) -> None:
        for node in code.nodes:
            if isinstance(node, Text):
                self.out.append(node.value)
            elif isinstance(node, Wikilink):
                self._link(node)
            elif isinstance(node, Template):
                self._template(node)
            elif isinstance(node, Tag):
                self._tag(node)
            elif isinstance(node, Heading):
                start = len(self.out)
                self.walk(node.title)
                heading = " ".join("".join(self.out[start:]).split())
                del self.out[start:]
                self.out.append(f"\n{_HEADING}{node.level}{heading}\n")
            elif isinstance(node, HTMLEntity):
                self.out.append(node.normalize())
            elif isinstance(node, ExternalLink):
                if node.brackets and node.title is not None:
                    self.walk(node.title)
            elif isinstance(node, (Comment, Argument)):
                continue

    def _link(self, node: Wikilink) -> None:
        title = str(node.title).strip()
        leading_colon = title.startswith(":")
        title = title.lstrip(":").strip()
        prefix, sep, rest = title.partition(":")
        prefix = prefix.strip().lower()
        if sep and not leading_colon:
            if prefix in _MEDIA_NS:
                return
            if node.text is None and prefix not in _INTERWIKI and _LANG_PREFIX.match(prefix):
                return  # interlanguage link: shown in the sidebar, not in the text
        if node.text is not None:
            self.walk(node.text)
        elif sep and prefix in _INTERWIKI:
            self.out.append(html.unescape(rest.strip()))
        else:
            self.out.append(html.unescape(title))

    def _template(self, node: Template) -> None:
        norm = template_name(str(node.name))
        index = 0 if norm.startswith("lang-") else _TEXT_TEMPLATES.get(norm)
        if index is None and norm not in ("convert", "cvt"):
            return
        positional = [p for p in node.params if not p.showkey]
        if index is not None:
            if -len(positional) <= index < len(positional):
                self.walk(positional[index].value)
        elif len(positional) >= 2:
            # {{convert|50|cm}} -> "50 cm"; {{convert|5|to|10|km}} -> "5 to 10 km"
            values = [str(p.value).strip() for p in positional[:4]]
            take = 4 if values[1] in _RANGE_WORDS and len(values) >= 4 else 2
            self.out.append(" ".join(values[:take]))

    def _tag(self, node: Tag) -> None:
        name = str(node.tag).strip().lower()
        if name in _DROP_TAGS:
            return
        if name in _LINE_TAGS:
            self.out.append("\n")
        if node.contents is not None and not node.self_closing:
            self.walk(node.contents)
        if name in _LINE_TAGS and name not in ("li", "dt", "dd", "br", "hr"):
            self.out.append("\n")


def _finish(text: str) -> str:
    """Intermediate text -> paragraphs and headings separated by blank lines, empty sections pruned."""
    text = _MAGIC.sub("", text)
    blocks: list[tuple[int, str]] = []  # (heading level or 0 for text, line)
    for line in text.split("\n"):
        if line.startswith(_HEADING):
            level = int(line[1]) if line[1:2].isdigit() else 2
            heading = _QUOTES.sub("", line[2:]).strip()
            if heading:
                blocks.append((level, heading))
            continue
        if "<" in line:
            line = _STRAY_TAG.sub(lambda m: "" if m.group(1).lower() in _HTML_TAGS else m.group(0), line)
        line = _EMPTY_PARENS.sub("", _SPACES.sub(" ", _QUOTES.sub("", line)))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line)).strip()
        if line and line not in ("|}", "{|", "|-"):
            blocks.append((0, line))
    return "\n\n".join(line for _, line in _prune(blocks))


def _prune(blocks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Drop boilerplate sections with their content, then headings with no text under them."""
    kept: list[tuple[int, str]] = []
    skip_level = 0
    for level, line in blocks:
        if skip_level and (level == 0 or level > skip_level):
            continue
        skip_level = 0
        if level and _is_boilerplate(line):
            skip_level = level
            continue
        kept.append((level, line))
    # Backwards, has_text[l] says whether text lies between here and the next heading of level <= l.
    has_text = [False] * 8
    result = []
    for level, line in reversed(kept):
        if level == 0:
            has_text = [True] * 8
            result.append((level, line))
            continue
        level = min(level, 7)
        if has_text[level]:
            result.append((level, line))
        for deeper in range(level, 8):
            has_text[deeper] = False
    result.reverse()
    return result
