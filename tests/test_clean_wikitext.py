"""Wikitext -> plain text: what is kept, what is dropped, and the redirect / disambiguation rules."""
from __future__ import annotations

import pytest

from data_prep.clean_wikitext import clean_wikitext, is_disambiguation_template, is_redirect

ARTICLE = """{{Infobox painting|title=The Thing|image=Thing.jpg|artist=[[Claude Monet]]}}
'''The Thing''' ({{lang-fr|La Chose}}) is a [[painting]] by [[Claude Monet|Monet]], {{convert|50|cm}} high.<ref>{{cite web|url=http://x.org|title=Source}}</ref> It hangs in [[Paris]]<ref name="a"/>.<!-- a hidden note -->
[[File:Thing.jpg|thumb|A caption with a [[link]]]]

== History ==
It was painted in 1870.&nbsp;See <span style="color:red">the span</span> and [http://example.com the site] (http://bare.example.com).
{| class="wikitable"
| table cell || another cell
|}
* first item
* second [[fr:Chose]] item

=== Empty subsection ===
{{main|Elsewhere}}

== See also ==
* [[Other painting]]

== References ==
{{reflist}}

[[Category:Paintings by Claude Monet]]
[[de:Das Ding]]
__NOTOC__
"""


def test_article_markup_is_stripped_and_prose_kept() -> None:
    page = clean_wikitext(ARTICLE, "The Thing")
    assert not page.disambiguation
    assert page.text.split("\n\n") == [
        "The Thing (La Chose) is a painting by Monet, 50 cm high. It hangs in Paris.",
        "History",
        "It was painted in 1870. See the span and the site.",
        "first item",
        "second item",
    ]


@pytest.mark.parametrize("junk", [
    "Infobox", "cite web", "Source", "hidden note", "Thing.jpg", "caption", "table cell", "Category",
    "Paintings by", "Das Ding", "Chose]]", "NOTOC", "Other painting", "References", "reflist", "Empty subsection",
    "http", "<", "{{", "[[", "'''",
])
def test_nothing_of_the_markup_survives(junk: str) -> None:
    assert junk not in clean_wikitext(ARTICLE, "The Thing").text


def test_headings_are_own_paragraphs_text_only() -> None:
    text = clean_wikitext("Intro.\n\n== ''Early'' life ==\nBorn.\n=== In [[Rome]] ===\nGrew up.\n").text
    assert text == "Intro.\n\nEarly life\n\nBorn.\n\nIn Rome\n\nGrew up."


def test_stray_closing_tag_and_entities() -> None:
    text = clean_wikitext("He said &quot;no&quot; [[OS&nbsp;X]].</blockquote> The x<y and a,<.> pair stay.").text
    assert text == 'He said "no" OS\u00a0X. The x<y and a,<.> pair stay.'.replace("\u00a0", " ")


def test_unclosed_ref_does_not_swallow_later_text() -> None:
    text = clean_wikitext("A<ref>open. B is kept.<ref>closed</ref> C.").text
    assert "C." in text and "closed" not in text


@pytest.mark.parametrize("raw", ["#REDIRECT [[Target]]", "  #redirect[[Target]]", "#Redirect [[T]] {{R from move}}"])
def test_redirects(raw: str) -> None:
    assert is_redirect(raw)


def test_not_redirect() -> None:
    assert not is_redirect("The #REDIRECT keyword is explained here.")


@pytest.mark.parametrize("name", [
    "disambiguation", "Disambiguation", "disambig", "dab", "DAB", "hndis", "geodis", "Template:Disambiguation",
    "hospital disambiguation", "Place name disambiguation", "disambiguation_page",
])
def test_disambiguation_templates(name: str) -> None:
    assert is_disambiguation_template(name)
    assert clean_wikitext(f"'''X''' may refer to:\n* [[X (a)]]\n{{{{{name}|date=May 2020}}}}").disambiguation


@pytest.mark.parametrize("name", ["set index article", "surname", "given name", "disambiguation needed", "about", "other uses"])
def test_not_disambiguation_templates(name: str) -> None:
    assert not is_disambiguation_template(name)
    assert not clean_wikitext(f"'''X''' is a thing.{{{{{name}}}}}").disambiguation


def test_disambiguation_by_title_and_in_see_also_section() -> None:
    assert clean_wikitext("'''Mercury''' may refer to:", "Mercury (disambiguation)").disambiguation
    # the template sits in a section that is cut before parsing; it must still count
    assert clean_wikitext("'''Ada''' may refer to:\n* [[Ada Lovelace]]\n== See also ==\n* [[Adah]]\n{{disambiguation}}").disambiguation


def test_empty_after_cleaning() -> None:
    assert clean_wikitext("{{Infobox}}\n[[Category:X]]\n<!-- nothing -->").text == ""
