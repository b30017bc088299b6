"""Built-in English text, so recipes run without a dataset hub.

- ``wiki-en`` / ``wiki-en-eval``: the shortened English Wikipedia dump that the gensim wheel carries for its
  tests (~200 articles, CC BY-SA 3.0, Wikipedia contributors). It is fetched once from PyPI with
  ``pip download --no-deps gensim`` (gensim is not installed, only unzipped), cleaned of wiki markup, and split
  by article: every 10th article (by title hash) is held out for evaluation and never trained on.
- ``sample``: a few paragraphs written for linspec (Apache-2.0), for tests and dry runs.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from linspec.errors import LinspecError
from linspec.utils.io import atomic_write_text
from linspec.utils.paths import cache_root

GENSIM_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
BUILTIN = ("wiki-en", "wiki-en-eval", "sample")

SAMPLE = """\
Linear attention replaces the softmax over all previous tokens with a running sum of key-value outer products. \
Each new token reads the sum with its query, so the cost of one decoding step does not grow with the length of \
the context. The price is accuracy: a sum of outer products cannot sharpen onto a single earlier token the way \
a softmax can.
Grouped linear attention keeps exact local interactions inside a small group of neighbouring tokens and uses the \
running sum only for complete groups further back. A causal convolution over the values adds a short, learnable \
memory of the most recent tokens. A scalar gate decides how much of the long-range sum each layer uses.
A model converted from softmax attention starts with the gate closed and the convolution at zero. Training opens \
them. The first stage, attention transfer, teaches every layer to imitate the output of the softmax layer it \
replaced, one layer at a time, while the rest of the network stays frozen. The second stage adapts the whole \
network with low-rank updates so that the layers work together again.
The river was high after the spring rain, and the ferry waited at the northern bank until the current slowed. \
Farmers brought baskets of apples and pears to the market in the square, and children ran between the stalls. \
In the evening the bells of the old church rang across the valley, and the lamps were lit one by one.
A compiler reads the source text of a program, checks that it follows the rules of the language, and translates \
it into instructions that a machine can run. Good error messages name the line, say what was expected, and \
suggest a fix. A test suite that runs in a few minutes is run often; one that takes an hour is run rarely.
The committee met on Tuesday to review the budget for the coming year. It agreed to repair the library roof, to \
extend the opening hours of the swimming pool during the summer, and to plant two hundred trees along the new \
cycle path that connects the station with the hospital.
Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on a mountain, where the air \
pressure is lower. This is why cooking an egg takes longer at high altitude, and why pressure cookers are popular \
in mountain villages.
"""


def builtin_file(name: str) -> Path:
    """A jsonl file (one document per line, field ``text``) for a built-in corpus, created on first use."""
    if name not in BUILTIN:
        raise LinspecError(f"unknown builtin corpus {name!r}; known: {', '.join(BUILTIN)}")
    folder = cache_root() / "corpora"
    if name == "sample":
        path = folder / "sample.jsonl"
        if not path.exists():
            lines = [json.dumps({"text": p}) for p in SAMPLE.strip().split("\n")]
            atomic_write_text(path, "\n".join(lines) + "\n")
        return path
    train, held_out = folder / "wiki-en.jsonl", folder / "wiki-en-eval.jsonl"
    if not (train.exists() and held_out.exists()):
        articles = wikipedia_articles(fetch_gensim_member(folder))
        is_eval = [int(hashlib.sha256(title.encode()).hexdigest(), 16) % 10 == 0 for title, _ in articles]
        for path, keep in ((train, False), (held_out, True)):
            lines = [
                json.dumps({"title": t, "text": x}) for (t, x), e in zip(articles, is_eval, strict=True) if e == keep
            ]
            atomic_write_text(path, "\n".join(lines) + "\n")
    return held_out if name == "wiki-en-eval" else train


def fetch_gensim_member(folder: Path) -> bytes:
    """The compressed Wikipedia sample from the gensim wheel on PyPI (downloaded once, without dependencies)."""
    cached = folder / "enwiki-shortened.xml.bz2"
    if cached.exists():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "gensim", "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("gensim-*.whl"))
        if result.returncode or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise LinspecError(f"could not fetch the gensim wheel for builtin:wiki-en ({tail[0]}); use local files")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(GENSIM_MEMBER)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wiki-en.CREDITS").write_text(
        "Text: Wikipedia contributors, CC BY-SA 3.0 (https://en.wikipedia.org), via the gensim test data "
        "(LGPL-2.1 package, https://pypi.org/project/gensim/).\n"
    )
    from linspec.utils.io import atomic_write_bytes

    atomic_write_bytes(cached, data)
    return data


def wikipedia_articles(compressed: bytes) -> list[tuple[str, str]]:
    """``(title, plain text)`` of every real article (redirects and stubs under 500 characters dropped)."""
    root = ElementTree.fromstring(bz2.decompress(compressed))
    ns = root.tag.split("}")[0] + "}"
    articles = []
    for page in root.iter(f"{ns}page"):
        title = page.findtext(f"{ns}title") or ""
        text = clean_wikitext(page.findtext(f"{ns}revision/{ns}text") or "")
        if ":" not in title and len(text) >= 500:
            articles.append((title, text))
    return articles


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans (templates and tables nest)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """Wiki markup to readable paragraphs: templates, tables, refs, files and markup removed, links kept as text."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(_drop_nested(text, "{{", "}}"), "{|", "|}")
    text = re.sub(r"\[\[(?:File|Image|Category):(?:[^\[\]]|\[\[[^\]]*\]\])*\]\]", "", text, flags=re.I)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = text.replace("&nbsp;", " ").replace("&ndash;", "–").replace("&mdash;", "—")
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"=+\s*(.*?)\s*=+", line)
        if heading:
            line = heading.group(1)
            if line.lower() in ("see also", "references", "external links", "further reading", "notes"):
                break  # the rest of an article is link lists
        line = re.sub(r"^[*#:;]+\s*", "", line)
        if line and not line.startswith(("|", "!")):
            paragraphs.append(re.sub(r"\s{2,}", " ", line))
    return "\n".join(paragraphs)
