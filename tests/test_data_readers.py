"""Readers on the real samples in ../shared/data and the gensim dump, and on every kind of bad input."""
from __future__ import annotations

import bz2
import importlib.util
import json
import os
import pickle
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.documents import InputError, SkipReport
from data_prep.readers import InputSpec, detect_format, gensim_sample_dump, input_bytes, plan_chunks, read_chunk
from data_prep.readers.mediawiki import split_pages
from data_prep.readers.wikitext import scan
from tests.data_required import require_shared_data



def shared(rel: str) -> Path:
    return require_shared_data(rel)


def read_all(specs, target: int = 64 << 20):
    report = SkipReport()
    chunks = plan_chunks(specs if isinstance(specs, list) else [specs], target)
    return chunks, [d for c in chunks for d in read_chunk(c, report)], report


def same_docs(a, b) -> bool:
    return [(d.key, d.title, d.text) for d in a] == [(d.key, d.title, d.text) for d in b]


@pytest.fixture(scope="module")
def paintings():
    """(path, documents read as one chunk) of the real Special:Export file."""
    path = shared("enwiki/paintings_export_2017.xml")
    chunks, docs, report = read_all(InputSpec(str(path)))
    assert len(chunks) == 1 and report.counts() == {"namespace": 11}
    return path, docs


def pages_of(path: Path) -> tuple[bytes, list[bytes]]:
    data = path.read_bytes()
    pages = re.findall(rb"  <page>.*?</page>\n", data, re.DOTALL)
    return data[: data.index(b"  <page>")], pages


def write_multistream(path: Path, tmp: Path, per_stream: int = 7) -> tuple[Path, Path, list[int]]:
    """A multistream dump laid out as Wikimedia's: header stream, streams of pages, footer stream, and
    the bz2 index of ``offset:page_id:title`` lines."""
    header, pages = pages_of(path)
    dump, index = tmp / "enwiki-test-pages-articles-multistream.xml.bz2", tmp / "enwiki-test-pages-articles-multistream-index.txt.bz2"
    lines, offsets = [], []
    with open(dump, "wb") as f:
        f.write(bz2.compress(header))
        for i in range(0, len(pages), per_stream):
            offsets.append(f.tell())
            for page in pages[i:i + per_stream]:
                pid = re.search(rb"<id>(\d+)</id>", page).group(1).decode()
                title = re.search(rb"<title>(.*?)</title>", page).group(1).decode()
                lines.append(f"{f.tell()}:{pid}:{title}\n")
            f.write(bz2.compress(b"".join(pages[i:i + per_stream])))
        f.write(bz2.compress(b"</mediawiki>\n"))
    index.write_bytes(bz2.compress("".join(lines).encode()))
    return dump, index, offsets


# --- real samples -------------------------------------------------------------------------------

def test_paintings_export(paintings) -> None:
    path, docs = paintings
    assert detect_format(path) == "mediawiki"
    assert len(docs) == 88  # 99 pages, 11 categories; this export has no redirects or disambiguation pages
    assert len({d.key for d in docs}) == 88 and all(d.key == f"wiki:{d.page_id}" for d in docs)
    first = docs[0]
    assert first.title == "Ville-d'Avray (1865 painting)" and first.page_id == 10954022
    assert first.url == "https://en.wikipedia.org/wiki/Ville-d'Avray_(1865_painting)"
    assert first.origin == f"{path}:page 10954022"
    assert all("{{" not in d.text and "[[" not in d.text and "<ref" not in d.text for d in docs)


def test_plain_xml_split_at_pages_gives_the_same_documents(paintings) -> None:
    path, docs = paintings
    chunks, split, report = read_all(InputSpec(str(path)), target=100_000)
    assert len(chunks) > 4 and [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert same_docs(split, docs) and report.counts() == {"namespace": 11}


def test_multistream_chunks_follow_the_index(paintings, tmp_path) -> None:
    path, docs = paintings
    dump, index, offsets = write_multistream(path, tmp_path)
    chunks, multi, report = read_all(InputSpec(str(dump)), target=60_000)  # index found by its name
    assert len(chunks) > 3
    assert chunks[0].start == 0 and chunks[-1].end == -1
    assert all(c.end == n.start and c.end in offsets for c, n in zip(chunks, chunks[1:]))
    assert same_docs(multi, docs) and report.counts() == {"namespace": 11}
    renamed = tmp_path / "dump.bz2"
    dump.rename(renamed)  # no index next to it: one chunk, unless index_path is given
    assert len(plan_chunks([InputSpec(str(renamed))], 60_000)) == 1
    assert len(plan_chunks([InputSpec(str(renamed), index_path=str(index))], 60_000)) == len(chunks)


def test_single_stream_bz2_is_one_chunk(paintings, tmp_path) -> None:
    path, docs = paintings
    dump = tmp_path / "export.xml.bz2"
    dump.write_bytes(bz2.compress(path.read_bytes()))
    chunks, read, _ = read_all(InputSpec(str(dump)), target=10_000)
    assert len(chunks) == 1 and same_docs(read, docs)


def test_gensim_sample_dump() -> None:
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim (the demo extra) is not installed: pip install -e .[demo]")
    path = gensim_sample_dump()
    _, docs, report = read_all(InputSpec(str(path)))
    assert report.counts() == {"redirect": 99, "disambiguation": 8, "namespace": 1}
    assert len(docs) == 98 and report.total() + len(docs) == 206
    assert docs[0].title == "Anarchism" and docs[0].text.startswith("Anarchism is a political philosophy")
    disambig = sorted(r for _, r, why in report.entries if why == "disambiguation")
    assert "page 590 [[Austin (disambiguation)]]" in disambig and "page 579 [[Alien]]" in disambig


def test_gensim_missing_names_the_demo_extra(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(InputError, match=re.escape("pip install -e .[demo]")):
        gensim_sample_dump()


def test_articles_jsonl() -> None:
    path = shared("enwiki/articles_2018.jsonl")
    assert detect_format(path) == "jsonl"
    chunks, docs, report = read_all(InputSpec(str(path)), target=1 << 20)
    assert len(chunks) == 12 and len(docs) == 3899 and report.total() == 0
    _, whole, _ = read_all(InputSpec(str(path)))
    assert same_docs(docs, whole)
    assert docs[0].key == "wiki:56564573" and docs[0].origin == f"{path}:line 1"
    assert docs[-1].origin == f"{path}:line 3899"
    assert not docs[0].text.startswith(docs[0].title + "\n")  # WikiExtractor's copy of the title is dropped
    assert "()" not in docs[0].text and "\n\nLocation.\n\n" in docs[0].text


@pytest.mark.parametrize("name,articles", [("test.txt", 60), ("valid.txt", 60)])
def test_wikitext_articles(name: str, articles: int) -> None:
    path = shared(f"wikitext2/{name}")
    assert detect_format(path) == "wikitext"
    chunks, docs, report = read_all(InputSpec(str(path)))
    assert len(docs) == articles and report.total() == 0
    assert len({d.key for d in docs}) == articles
    small_chunks, split, _ = read_all(InputSpec(str(path)), target=50_000)
    assert len(small_chunks) > 10 and same_docs(split, docs)  # "#n" keys of repeated titles match
    assert not any(re.search(r"^= =", d.text, re.M) for d in docs)  # sub-headings are text only


def test_wikitext_equation_lines_are_not_headings() -> None:
    path = shared("wikitext2/test.txt")
    bare = [line for _, line, raw, _ in scan(str(path)) if re.fullmatch(rb" = [^=].* = \n", raw)]
    titled = {line for _, line, _, title in scan(str(path)) if title is not None}
    rejected = sorted(set(bare) - titled)
    assert len(bare) == 62 and rejected == [2149, 2151]
    _, docs, _ = read_all(InputSpec(str(path)))
    holder = [d for d in docs if "1 <unk> / s and a nominal <unk> k" in d.text]
    assert len(holder) == 1 and "<unk> @-@ derived filter" not in holder[0].title
    assert [d.key for d in docs].count("wikitext:test.txt:<unk>") == 1 and "wikitext:test.txt:<unk>#2" in {d.key for d in docs}


def test_books() -> None:
    path = shared("books/sherlock_holmes")
    assert detect_format(path) == "books"
    chunks, docs, report = read_all(InputSpec(str(path), group="sherlock_holmes"), target=600_000)
    assert len(chunks) == 2 and len(docs) == 5 and report.total() == 0
    assert docs[0].key == "book:sherlock_holmes/01_a_study_in_scarlet.txt" and docs[0].title == "A Study In Scarlet"
    assert [d.group for d in docs] == ["sherlock_holmes"] * 5
    for d in docs:
        for licence in ("Gutenberg-tm", "*** START", "*** END", "START OF TH", "End of Project Gutenberg",
                        "End of the Project Gutenberg", "www.gutenberg.org", "Produced by", "License"):
            assert licence not in d.text, (d.title, licence)
        assert "\r" not in d.text and "\ufeff" not in d.text and d.text[:1].isalpha()
    assert docs[4].text.endswith("stop at Marcini’s for a little dinner on the way?”")
    _, alone, _ = read_all(InputSpec(str(path / "02_the_sign_of_the_four.txt"), format="books"))
    assert alone[0].key == "book:/02_the_sign_of_the_four.txt" and alone[0].text == docs[1].text


def test_wikiextractor_folder(tmp_path) -> None:
    rows = [json.loads(line) for line in shared("enwiki/articles_2018.jsonl").read_text().splitlines()[:60]]
    (tmp_path / "AA").mkdir()
    (tmp_path / "AB").mkdir()

    def doc_format(rs):
        return "".join(f'<doc id="{r["id"]}" url="{r["url"]}" title="{r["title"]}">\n{r["text"]}\n</doc>\n' for r in rs)

    (tmp_path / "AA" / "wiki_00").write_text(doc_format(rows[:20]))
    (tmp_path / "AA" / "wiki_01").write_text("".join(json.dumps(r) + "\n" for r in rows[20:40]))  # --json
    (tmp_path / "AB" / "wiki_00.bz2").write_bytes(bz2.compress(doc_format(rows[40:]).encode()))
    assert detect_format(tmp_path) == "wikiextractor"
    chunks, docs, report = read_all(InputSpec(str(tmp_path)), target=1)
    assert len(chunks) == 3 and report.total() == 0
    assert input_bytes(chunks) == [os.path.getsize(f) for f in (tmp_path / 'AA' / 'wiki_00', tmp_path / 'AA' / 'wiki_01',
                                                                  tmp_path / 'AB' / 'wiki_00.bz2')]
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert same_docs(docs, read_all(InputSpec(str(jsonl)))[1])
    assert docs[0].origin == f"{tmp_path / 'AA' / 'wiki_00'}:line 1"
    cut = doc_format(rows[40:])[:-8]  # the last </doc> is lost
    (tmp_path / "AB" / "wiki_00.bz2").write_bytes(bz2.compress(cut.encode()))
    _, docs, report = read_all(InputSpec(str(tmp_path)))
    start = cut[: cut.rindex("<doc ")].count("\n") + 1
    assert len(docs) == 59 and report.entries == [
        (str(tmp_path / "AB" / "wiki_00.bz2"), f"line {start}: <doc> not closed before the end of the file", "truncated")
    ]
    (tmp_path / "AB" / "wiki_00.bz2").write_bytes(bz2.compress(doc_format(rows[40:]).encode())[:-30])
    with pytest.raises(InputError, match=r"AB/wiki_00.bz2: cannot read, the file is truncated or corrupt"):
        read_all(InputSpec(str(tmp_path)))
    (tmp_path / "AA" / "wiki_00").write_text('<doc url="x">\ntext\n</doc>\n')
    with pytest.raises(InputError, match=r"wiki_00: line 1: malformed <doc> line"):
        read_all(InputSpec(str(tmp_path)))


def test_parquet_by_row_groups(tmp_path) -> None:
    rows = [json.loads(line) for line in shared("enwiki/articles_2018.jsonl").read_text().splitlines()[:300]]
    table = pa.Table.from_pylist([{k: r[k] for k in ("id", "url", "title", "text")} for r in rows])
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=50)
    assert detect_format(path) == "parquet"
    chunks, docs, report = read_all(InputSpec(str(path)), target=1)
    assert [(c.start, c.end) for c in chunks] == [(i, i + 1) for i in range(6)] and len(docs) == 300
    meta = pq.ParquetFile(path).metadata
    assert input_bytes(chunks) == [meta.row_group(i).total_byte_size for i in range(6)]
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert same_docs(docs, read_all(InputSpec(str(jsonl)))[1]) and docs[299].origin == f"{path}:row 300"
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"id": ["1", "2"], "title": ["A", "B"], "text": ["Some text.", None]}), broken)
    _, docs, report = read_all(InputSpec(str(broken)))
    assert len(docs) == 1 and report.entries == [(str(broken), "row 2: missing field text", "missing_field")]
    pq.write_table(pa.table({"id": ["1"], "body": ["x"]}), broken)
    with pytest.raises(InputError, match=r"broken.parquet: parquet file lacks column\(s\) title, text"):
        plan_chunks([InputSpec(str(broken))])



def test_input_bytes_cover_every_byte_once_and_the_largest_go_first(paintings) -> None:
    """Chunks of byte-range inputs add up to their file; a folder's chunks to its files. The encode
    phase hands chunks to Ray largest first (ties in chunk order), the scheduling the prep relies on."""
    from data_prep.pipeline import largest_first

    inputs = [InputSpec(str(shared("enwiki/articles_2018.jsonl"))), InputSpec(str(shared("wikitext2/valid.txt")), "wikitext"),
              InputSpec(str(paintings[0])), InputSpec(str(shared("books/sherlock_holmes")), "books")]
    chunks = plan_chunks(inputs, 1 << 20)
    sizes = input_bytes(chunks)
    books = sum(f.stat().st_size for f in shared("books/sherlock_holmes").glob("*.txt"))
    for i, total in enumerate([os.path.getsize(s.path) for s in inputs[:3]] + [books]):
        assert sum(n for c, n in zip(chunks, sizes) if c.input_index == i) == total
    order = largest_first(chunks, list(range(len(chunks))))
    assert sorted(order) == list(range(len(chunks))) and [sizes[i] for i in order] == sorted(sizes, reverse=True)
    assert order[:2] != [0, 1] and largest_first(chunks, [3, 1]) == sorted([3, 1], key=lambda i: (-sizes[i], i))
    assert input_bytes([]) == [] and largest_first(chunks, []) == []


# --- bad input ----------------------------------------------------------------------------------

def test_truncated_bz2_is_fatal_and_names_the_stream(paintings, tmp_path) -> None:
    path, _ = paintings
    dump, _, offsets = write_multistream(path, tmp_path)
    data = dump.read_bytes()
    dump.write_bytes(data[: offsets[5] + 300])  # cut inside the sixth page stream: the index sees it
    with pytest.raises(InputError, match=rf"{dump}: the index lists a stream at byte {offsets[6]}, beyond the end of "
                                         rf"the file \({offsets[5] + 300} bytes\): the dump is truncated"):
        plan_chunks([InputSpec(str(dump))])
    dump.write_bytes(data[: offsets[-1] + 300])  # cut inside the last page stream
    chunks = plan_chunks([InputSpec(str(dump))], target_chunk_bytes=1)
    assert len(chunks) == len(offsets) and chunks[-1].start == offsets[-1]
    docs = list(read_chunk(chunks[-2], SkipReport()))  # the streams before the cut are whole
    assert [d.title for d in docs] == ["The Harvest Wagon"]  # with six category pages
    with pytest.raises(InputError) as err:
        list(read_chunk(chunks[-1], SkipReport()))
    assert str(err.value) == (f"{dump}: bz2 data truncated: the stream starting at byte {offsets[-1]} reaches the end "
                              f"of the file (byte {offsets[-1] + 300}) without its end marker; the file is incomplete "
                              "or the index does not match")
    single = tmp_path / "single.xml.bz2"
    single.write_bytes(bz2.compress(path.read_bytes())[:200_000])
    with pytest.raises(InputError, match=re.escape(f"{single}: bz2 data truncated: the stream starting at byte 0")):
        read_all(InputSpec(str(single)))


def test_index_that_does_not_match_the_dump(paintings, tmp_path) -> None:
    path, _ = paintings
    dump, index, offsets = write_multistream(path, tmp_path)
    index.write_bytes(bz2.compress(f"{offsets[0]}:1:Somewhere\n{offsets[1] + 5}:2:Nowhere\n".encode()))
    first, second = plan_chunks([InputSpec(str(dump))], target_chunk_bytes=1)
    with pytest.raises(InputError, match=rf"{dump}: corrupt bz2 data in the stream starting at byte {offsets[1] + 5}"):
        list(read_chunk(second, SkipReport()))
    with pytest.raises(InputError, match=rf"{dump}: bz2 data truncated: the stream starting at byte {offsets[1]} "
                                         rf"reaches the chunk end set by the index \(byte {offsets[1] + 5}\)"):
        list(read_chunk(first, SkipReport()))
    index.write_bytes(bz2.compress(b"not an index line\n"))
    with pytest.raises(InputError, match=r"index.txt.bz2: line 1: expected 'offset:page_id:title'"):
        plan_chunks([InputSpec(str(dump))])


def test_malformed_xml_names_file_page_and_line(paintings, tmp_path) -> None:
    path, _ = paintings
    data = path.read_text()
    at = data.index("<title>The Jack Pine</title>")
    bad = data[:at] + data[at:].replace("<ns>0</ns>", "<ns>0</nz>", 1)
    line = bad[: bad.index("</nz>")].count("\n") + 1
    start = bad[: bad.rindex("<page>", 0, at)].count("\n") + 1
    page_id = re.search(r"<id>(\d+)</id>", data[at:]).group(1)
    broken = tmp_path / "broken.xml"
    broken.write_text(bad)
    with pytest.raises(InputError) as err:
        read_all(InputSpec(str(broken)), target=50_000)
    assert str(err.value) == (f"{broken}: malformed XML in page {page_id} [[The Jack Pine]] (line {start}): "
                              f"line {line}, column 11: mismatched tag")
    broken.write_text(data[: data.index("<title>The Jack Pine</title>")])
    with pytest.raises(InputError, match=r"broken.xml: page starting at line \d+ has no </page>: the XML is truncated"):
        read_all(InputSpec(str(broken)))
    broken.write_text("<html><body>not a dump</body></html>")
    with pytest.raises(InputError, match=r"broken.xml: not a MediaWiki XML export"):
        plan_chunks([InputSpec(str(broken), format="mediawiki")])


def test_invalid_utf8_and_duplicate_pages_are_skipped_and_counted(paintings, tmp_path) -> None:
    path, docs = paintings
    header, pages = pages_of(path)
    pages[3] = pages[3].replace(b"<text", b"<text>\xff\xfe</text><junk", 1)
    data = header + b"".join(pages) + pages[10] + b"</mediawiki>\n"
    bad = tmp_path / "bad.xml"
    bad.write_bytes(data)
    _, read, report = read_all(InputSpec(str(bad)))
    assert report.counts() == {"duplicate_page_id": 1, "invalid_utf8": 1, "namespace": 11}
    dup = [r for _, r, why in report.entries if why == "duplicate_page_id"][0]
    utf = [r for _, r, why in report.entries if why == "invalid_utf8"][0]
    assert dup.startswith(f"page {docs[10].page_id} [[{docs[10].title}]] (line ")
    assert utf.startswith(f"page {docs[3].page_id} [[{docs[3].title}]] (line ")
    assert [d.key for d in read] == [d.key for i, d in enumerate(docs) if i != 3]


def test_too_long_articles(paintings) -> None:
    path, _ = paintings
    _, docs, report = read_all(InputSpec(str(path), max_chars=20_000))
    assert report.counts() == {"namespace": 11, "too_long": 8} and len(docs) == 80
    pages = [(b"x" * 10_000).join([b"<page><title>Big</title><id>7</id>", b"</page>"]),
             b"<page><title>Small</title><id>8</id></page>"]
    out = list(split_pages(iter([(b"".join(pages[:1]), -1), (pages[1], -1)]), 1, max_bytes=5_000))
    assert [(raw is None, line) for raw, line, _, _ in out] == [(True, 1), (False, 1)]
    assert b"<title>Big</title>" in out[0][3]  # the head is kept to name the skipped page


def test_missing_inputs(tmp_path) -> None:
    for spec in (InputSpec(str(tmp_path / "nope.xml")), InputSpec(str(tmp_path / "nope.jsonl"), format="jsonl"),
                 InputSpec(str(tmp_path / "nodir"), format="books")):
        with pytest.raises(InputError, match=re.escape(spec.path)):
            plan_chunks([spec])
    text = tmp_path / "a.jsonl"
    text.write_text('{"id": 1, "title": "A", "text": "Body."}\n')
    chunk = plan_chunks([InputSpec(str(text))])[0]
    text.unlink()
    with pytest.raises(InputError, match=re.escape(f"{text}: input file does not exist")):
        list(read_chunk(chunk, SkipReport()))


def test_bad_jsonl_lines_are_named_by_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    good = lambda i, text="Some text.": json.dumps({"id": str(i), "url": f"u{i}", "title": f"T{i}", "text": text})
    lines = [good(1).encode(), b"this is not json", json.dumps({"id": "3", "title": "T3"}).encode(),
             b'{"id": "4", "title": "T4", "text": "caf\xe9"}', b"", good(1).encode(), good(6, "x" * 200).encode(),
             good(7, "Mercury may refer to:\nMercury (planet)").encode(), good(8, "  \n ").encode(), b'{"id": "9", "tit']
    path.write_bytes(b"\n".join(lines))
    _, docs, report = read_all(InputSpec(str(path), max_chars=100))
    bad_byte = lines[3].index(b"\xe9")
    assert [d.key for d in docs] == ["wiki:1"]
    assert report.entries == [
        (str(path), "line 2: Expecting value at column 1", "bad_json"),
        (str(path), "line 3: missing field text", "missing_field"),
        (str(path), f"line 4: byte {bad_byte} of the line is not valid UTF-8", "invalid_utf8"),
        (str(path), "line 6 (id 1)", "duplicate_page_id"),
        (str(path), "line 7 (id 6)", "too_long"),
        (str(path), "line 8 (id 7)", "disambiguation"),
        (str(path), "line 9 (id 8)", "empty"),
        (str(path), "line 10: Unterminated string starting at at column 13", "bad_json"),
    ]


def test_books_with_a_wrong_encoding_are_skipped(tmp_path) -> None:
    (tmp_path / "a.txt").write_bytes("Caf\u00e9 au lait.\n".encode("latin-1"))
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfLine one\r\nstill one.\r\n\r\nTwo.\r\n")
    _, docs, report = read_all(InputSpec(str(tmp_path), format="books", group="g"))
    assert [(d.key, d.title, d.text) for d in docs] == [("book:g/b.txt", "b", "Line one still one.\n\nTwo.")]
    assert report.entries == [(str(tmp_path / "a.txt"), "byte 3", "invalid_utf8")]


def test_skip_report_merges_caps_and_writes_atomically(tmp_path) -> None:
    a, b = SkipReport(max_entries=3), SkipReport()
    for i in range(2):
        a.skip("f", f"line {i}", "empty")
    for i in range(4):
        b.skip("g", f"page {i}", "redirect")
    a = pickle.loads(pickle.dumps(a))
    a.merge(b)
    assert a.counts() == {"empty": 2, "redirect": 4} and len(a.entries) == 3
    out = a.to_dict(max_entries=2)
    assert out["total"] == 6 and len(out["entries"]) == 2 and out["entries_not_shown"] == 4
    a.write_json(tmp_path / "sub" / "prep_report.json")
    assert json.loads((tmp_path / "sub" / "prep_report.json").read_text())["counts"] == {"empty": 2, "redirect": 4}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["prep_report.json"]


def test_pages_straddling_read_blocks(paintings) -> None:
    path, _ = paintings
    data = path.read_bytes()
    whole = list(split_pages(iter([(data, -1)]), 1, 1 << 30))
    tiny = list(split_pages(iter((data[i:i + 7], -1) for i in range(0, len(data), 7)), 1, 1 << 30))
    assert len(whole) == 99 and whole == tiny
    assert whole[0][1] == data[: data.index(b"<page>")].count(b"\n") + 1
