"""Text: cleaning openclipart titles, descriptions and keywords, and writing the descriptive caption.

:func:`_prepare_text` is the build's first filter: it drops records whose text is junk (counted by reason) and
turns the others into candidates with a clean title, description, keywords and :func:`descriptive_caption`.
:func:`_title_key` is the normalised title that near-duplicate grouping compares.
"""

from __future__ import annotations

import html
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

from .openclipart import ClipartRecord, _Candidate

# -- text patterns --------------------------------------------------------------------------------------------
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL_RE = re.compile(r"(?:https?://|ftp://|www\.)\S+|\b[\w.-]+\.(?:com|org|net|edu|gov)(?:/\S*)?\b", re.I)
_HASH_RE = re.compile(r"\bhash\s*\(\s*0x[0-9a-f]+\s*\)|\bhash\b", re.I)
_CONVERSION_RE = re.compile(
    r"\b(?:eps|ai|wmf|emf|pdf|bitmap|png)\s+converted\b|\bconverted\s+(?:from|to|with|by|in|using)\b", re.I
)
_MARKUP_RE = re.compile(r"<[^>]*>|&[a-z]+;|<!--")
_CREDIT_RE = re.compile(
    r"^(?:created|made|drawn|designed|done|create)\s+(?:with|by|in|using)\b|\binkscape\b|^data from\b"
    r"|^contact\b|\bcopyright\b|\bpublic domain\b|\blicen[cs]e\b|\bcreative commons\b|\be-?mail\b"
    r"|\bsubmission\b",
    re.I,
)
_COLLECTION_NOTE_RE = re.compile(
    r"\bpart of\b.*\b(?:collection|set|series)\b|\bcollection of\b|\bclip\s?art collection\b", re.I
)
#: Titles that name a whole icon theme or collection: the files carry no title of their own; dropped.
_THEME_TITLE_RE = re.compile(
    r"\bicon\s+(?:collection|theme|set)\b|\bicon-?theme\b|\biconset\b|\bicons$|[\s-]theme$|\bsvg theme\b"
    r"|\bgradient collection\b",
    re.I,
)
#: Other collection titles: the file name usually names the drawing, so the title is taken from it.
_GENERIC_TITLE_RE = re.compile(
    r"\bcollection\b|\bclip\s?arts?\b|\bs[iu]bmission\b|\bsymbol[\s_]signs\b|^svg\b|\bopen\s?clip\s?art\b"
    r"|^(?:untitled|image|drawing|picture|new document|layer|figure|unnamed|no title)\s*\d*$|^various\b",
    re.I,
)
_GROUP_PREFIX_RE = re.compile(r"^clip\s?art\s+by\s+[^-]+?\s+-\s+(?P<name>.+)$", re.I)
_GROUP_SUFFIX_RE = re.compile(
    r"^(?P<name>.+?)\s+-\s+[^-]*\b(?:elements|collection|set|series|clip\s?art)$", re.I
)
_EXT_RE = re.compile(r"\.(?:svg|svgz|png|jpe?g|ai|eps|wmf|pdf|xcf)\b", re.I)
_BW_RE = re.compile(r"\(\s*b\s*(?:and|&)\s*w\s*\)|\bb\s*&\s*w\b|\bb and w\b", re.I)
_OPENCLIPART_RE = re.compile(r"\bopen\s?clip\s?art(?:\.org)?\b", re.I)
_COLOUR_NOTE_RE = re.compile(r"\(\s*colou?r(?:ed)?\s*\)", re.I)
_CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])")
_TRAILING_NUMBER_RE = re.compile(r"(?<=[A-Za-z])[_#-]?\d+[a-z]?$|\s+#?0\d+[a-z]?$|\s*#\d+$")
_WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")

_META_KEYWORDS = frozenset(
    """hash unsorted openclipart clipart clip art icon icons theme themes lemon theme icon magick mapsym
    appicon webpage svg inkscape image images drawing clip art library buttons menu special misc various
    other stuff new""".split()
) | {"lemon_theme_icon", "clip art", "open clip art", "lemon theme icon", "open clip art library"}
_STOPWORDS = frozenset(
    """a an the of and or in on at to for with from by is are was this that it its as be into over under
    his her their your my our some very one two""".split()
)
#: Words that distinguish colour, orientation or style variants; dropped from the near-duplicate title key.
_VARIANT_WORDS = frozenset(
    """red green blue yellow orange purple violet pink brown black white grey gray gold golden silver
    cyan magenta turquoise seagreen navy beige dark light bright pale colour color colours colors coloured
    colored bw and w outline outlined simple simplified alt alternate alternative version ver v small large
    big mini left right up down top bottom front back side rosso verde blu giallo nero bianco rouge vert bleu
    jaune noir blanc rot grun gruen blau gelb schwarz weiss new old shiny glossy flat plain filled empty""".split()
)
_FILENAME_JUNK_TOKENS = frozenset("aiga bb gnome stock fs mime md xp svg png ico tango".split())


# -- text cleaning --------------------------------------------------------------------------------------------
def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def _dedupe_words(text: str) -> str:
    """Drop a word that repeats the word before it ("the the", "moulure moulures")."""
    out: list[str] = []
    for word in text.split(" "):
        prev = out[-1].lower() if out else ""
        low = word.lower().rstrip(",;:.")
        if prev and prev[-1:].isalnum() and (low == prev or low == prev + "s" or prev == low + "s"):
            continue
        out.append(word)
    return " ".join(out)


def _tidy_title(raw: str) -> str:
    """Turn a title or a file name into plain words ("cake1" -> "cake", "StopSign" -> "Stop Sign")."""
    text = _EMAIL_RE.sub(" ", raw)
    text = _URL_RE.sub(" ", text)
    text = _EXT_RE.sub(" ", text)
    text = text.replace("_", " ")
    text = _OPENCLIPART_RE.sub(" ", text)
    text = _BW_RE.sub(" in black and white ", text)
    text = _COLOUR_NOTE_RE.sub(" ", text)
    if " " not in text.strip():
        text = text.replace("-", " ")
        text = _CAMEL_RE.sub(" ", text)
    text = re.sub(r"\(\s*\)", " ", text)
    text = _squash(text)
    prev = None
    while prev != text:
        prev = text
        text = _TRAILING_NUMBER_RE.sub("", text).strip(" -_#,.;:")
    text = re.sub(r"\s+([,;:)])", r"\1", text)
    text = re.sub(r"\(\s+", "(", text)
    if len(text) > 5 and text.isupper():
        text = text.title()
    return _dedupe_words(_squash(text))


def _meaningful(title: str) -> bool:
    return any(len(w) >= 3 for w in _WORD_RE.findall(title))


def _filename_title(rec: ClipartRecord) -> str:
    """Derive a title from the file name, without the author's name and numbering."""
    stem = rec.rel.rsplit("/", 1)[-1]
    stem = re.sub(r"[_\s]+(?:\d+[a-z]?)?_*$", "", stem)
    slug = re.sub(r"[^a-z0-9]+", "_", rec.creator.lower()).strip("_")
    low = stem.lower().strip("_")
    if slug and len(low) >= 3 and slug.startswith(low):
        return ""  # the file is named after its author only
    for cut in range(len(slug), 2, -1):  # author names are truncated in the file names
        suffix = "_" + slug[:cut].rstrip("_")
        if low.endswith(suffix) and len(low) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    tokens = [t for t in re.split(r"[_\-\s.]+", _CAMEL_RE.sub("_", stem)) if t]
    # "bar1" -> "bar", "home06a" -> "home"; tokens that still hold digits ("70a006") are numbering
    tokens = [re.sub(r"(?<=[^\W\d_])\d+[a-z]?$", "", t) for t in tokens]
    tokens = [t for t in tokens if not any(c.isdigit() for c in t)]
    while tokens and tokens[0].lower() in _FILENAME_JUNK_TOKENS:
        tokens = tokens[1:]
    while tokens and tokens[-1].lower() in _FILENAME_JUNK_TOKENS:
        tokens = tokens[:-1]
    return _tidy_title(" ".join(t for t in tokens if len(t) > 1))


def _clean_keywords(rec: ClipartRecord) -> tuple[str, ...]:
    creator = _squash(re.sub(r"\(.*?\)|\[.*?\]", " ", rec.creator)).lower()
    out: list[str] = []
    for raw in rec.keywords:
        kw = _HASH_RE.sub(" ", raw)
        kw = _EMAIL_RE.sub(" ", kw)
        kw = _squash(kw.replace("_", " ").replace("-", " ")).lower().strip(" .,;:")
        kw = _squash(_OPENCLIPART_RE.sub(" ", re.sub(r"\b0x[0-9a-f]+\b", " ", kw)))
        too_long = len(kw) > 30 or (" " not in kw and len(kw) > 18)
        if not kw or kw in _META_KEYWORDS or too_long or not _meaningful(kw):
            continue
        if creator and (kw == creator or kw in creator.split()):
            continue
        if kw not in out:
            out.append(kw)
    return tuple(out)


def _folder_keywords(rec: ClipartRecord) -> tuple[str, ...]:
    """Topic words from the package's folders ("food/fruit/pear" -> "food", "fruit")."""
    out: list[str] = []
    for part in rec.rel.split("/")[:-1]:
        kw = _squash(re.sub(r"[_-]+", " ", part)).lower()
        if kw and kw not in _META_KEYWORDS and kw not in out and _meaningful(kw) and not kw.endswith("theme"):
            out.append(kw)
    return tuple(out)


def _clean_description(raw: str, title: str, notes: Counter[str]) -> str:
    """Return a short clean description, or "" (the reason is counted in ``notes``)."""
    text = _squash(raw)
    if not text:
        return ""
    if _EMAIL_RE.search(text):
        notes["description_email"] += 1
        return ""
    if _CONVERSION_RE.search(text):
        notes["description_conversion_note"] += 1
        return ""
    if _MARKUP_RE.search(text) or _HASH_RE.search(text):
        notes["description_markup_or_hash"] += 1
        return ""
    if _CREDIT_RE.search(text) or _COLLECTION_NOTE_RE.search(text):
        notes["description_credit_or_collection_note"] += 1
        return ""
    stripped = _squash(_URL_RE.sub(" ", text))
    if stripped != text:
        notes["description_url_removed"] += 1
        text = stripped
    text = _BW_RE.sub(" in black and white ", text)
    text = re.sub(r"[,;:.]?\s*enjoy(?:\s+it)?\s*[!.]*\s*$", "", text, flags=re.I)
    text = re.split(r"(?<=[a-z)])\s*[.!?](?:\s|$)", text, maxsplit=1)[0]  # first sentence
    text = re.sub(r"^(?:this is|here is|it is|this image is)\s+", "", text, flags=re.I)
    text = re.sub(r"\.{2,}.*$", "", text).strip(" .,;:!-")
    if len(text.split(" ")) > 25:
        notes["description_too_long"] += 1
        return ""
    title_words = {w.lower() for w in _WORD_RE.findall(title)} | _STOPWORDS
    desc_words = {w.lower() for w in _WORD_RE.findall(text) if len(w) > 1}
    if not desc_words or desc_words <= title_words or not _meaningful(text):
        notes["description_redundant"] += 1
        return ""
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and not (len(first) > 1 and first.isupper()):
        text = text[0].lower() + text[1:]
    return _dedupe_words(_squash(text))


def descriptive_caption(title: str, description: str, keywords: Sequence[str], icon: bool = False) -> str:
    """Compose the descriptive English caption of one image.

    Parameters
    ----------
    title
        The cleaned title.
    description
        A cleaned description, or "".
    keywords
        Keywords to mention, most useful first; the first eight not already in the text are used.
    icon
        Say "An icon of" instead of "A clip art image of".

    Returns
    -------
    str
        For example ``"A clip art image of Saturn: the planet Saturn; keywords: astronomy, planet, space."``
    """
    prefix = "An icon of" if icon and not re.search(r"\bicons?\b", title, re.I) else "A clip art image of"
    text = f"{prefix} {title}"
    if description:
        text += f": {description}"
    seen = {w.lower() for w in _WORD_RE.findall(f"{title} {description}")}
    kws: list[str] = []
    for kw in keywords:
        words = {w.lower() for w in _WORD_RE.findall(kw)} - _STOPWORDS
        if words and words <= seen | {w + "s" for w in seen} | {w[:-1] for w in seen if w.endswith("s")}:
            continue
        kws.append(kw)
        seen |= words
        if len(kws) == 8:
            break
    if kws:
        text += "; keywords: " + ", ".join(kws)
    text = _dedupe_words(_squash(text)).rstrip(" .,;:") + "."
    return text


def _title_key(title: str) -> str:
    words = []
    for w in _WORD_RE.findall(title.lower()):
        if w in _VARIANT_WORDS or w in _STOPWORDS or len(w) < 2:
            continue
        words.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return " ".join(words)


def _prepare_text(
    records: list[ClipartRecord], dropped: Counter[str], notes: Counter[str], *, broad: bool = False
) -> list[_Candidate]:
    """Clean titles, descriptions and keywords; drop records whose text is junk.

    ``broad`` (used for the stand-in pool) keeps icon-theme drawings under a title taken from their file name
    and drawings whose title no second author uses: more images with plainer captions.
    """
    cands: list[_Candidate] = []
    keyword_df: Counter[str] = Counter()
    creators_of: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        keyword_df.update({w.lower() for kw in _clean_keywords(rec) for w in _WORD_RE.findall(kw)})
        who = rec.creator.lower() or f"anonymous:{rec.rel}"
        for w in _WORD_RE.findall(
            f"{rec.title} {rec.description} {' '.join(rec.keywords)}".replace("_", " ")
        ):
            creators_of[w.lower()].add(who)
    # words that several authors use: mostly English, since the few non-English titles come from single authors
    lexicon = {w for w, who in creators_of.items() if len(who) >= 2 and len(w) >= 3}
    title_count = Counter(_squash(rec.title).lower() for rec in records)
    description_count = Counter(_squash(rec.description).lower() for rec in records)
    for rec in records:
        raw = _squash(rec.title)
        if _EMAIL_RE.search(raw):
            dropped["email_in_title"] += 1
            continue
        if _CONVERSION_RE.search(raw):
            dropped["conversion_note_in_title"] += 1
            continue
        spaced = _squash(raw.replace("_", " "))
        if _THEME_TITLE_RE.search(spaced):
            named = _filename_title(rec) if broad else ""
            if not _meaningful(named):
                dropped["generic_collection_title"] += 1
                continue
            spaced = raw = named
        keywords = _clean_keywords(rec)
        origin = "metadata"
        m = _GROUP_PREFIX_RE.match(spaced) or _GROUP_SUFFIX_RE.match(spaced)
        if m and _GROUP_PREFIX_RE.match(spaced) and title_count[raw.lower()] >= 3:
            # "Clipart by <author> - <drawing>" shared by several files: a collection whose files name
            # different drawings; its keywords describe the collection, so keep only those the folders confirm
            named = _filename_title(rec)
            raw, origin = (
                (named, "file_name") if _meaningful(named) else (m.group("name"), "collection_title")
            )
            folders = _folder_keywords(rec)
            context = {w.lower() for w in _WORD_RE.findall(f"{named} {' '.join(folders)}")}
            keywords = folders + tuple(
                k for k in keywords if k not in folders and set(_WORD_RE.findall(k)) <= context
            )
        elif m:
            raw, origin = m.group("name"), "collection_title"
        elif _GENERIC_TITLE_RE.search(spaced) or (rec.creator and raw.lower() == rec.creator.lower()):
            raw, origin = "", "generic_title"
        title = _tidy_title(raw)
        if not _meaningful(title):
            title = _filename_title(rec)
            origin = "file_name" if origin == "metadata" else f"{origin}+file_name"
        if not _meaningful(title) and keywords:
            title = keywords[0]
            origin += "+keyword"
        if not _meaningful(title):
            dropped["generic_collection_title" if "generic" in origin else "empty_title"] += 1
            continue
        if origin != "metadata":
            notes[f"title_from_{origin.split('+')[-1]}"] += 1
        if rec.description.strip() and description_count[_squash(rec.description).lower()] >= 5:
            notes["description_shared_by_collection"] += 1  # a note about a whole set, not this drawing
            description = ""
        else:
            description = _clean_description(rec.description, title, notes)
        title_known = any(w.lower() in lexicon for w in _WORD_RE.findall(title))
        if not title_known and not keywords and not description and not broad:
            dropped["uninformative_text"] += 1
            continue
        if not keywords:
            keywords = _folder_keywords(rec)
        kws = tuple(sorted(keywords, key=lambda k: (-keyword_df[k.split(" ")[0]], k)))
        icon = "/icons/" in f"/{rec.rel}/" or rec.topic == "buttons"
        cand = _Candidate(record=rec, title=title, title_origin=origin, description=description, keywords=kws)
        cand.caption = descriptive_caption(title, description, kws, icon=icon)
        cands.append(cand)
    return cands
