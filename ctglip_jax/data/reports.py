"""Organ-level report parsing: which sentences speak of which organ, and is that organ abnormal.

CT-GLIP aligns each organ's embedding with the report text about that organ, so the report is cut into
sentences, each sentence is assigned to the organs it names (see `organ_terms`), and each organ gets an
abnormal flag. The flag is decided per clause with a small rule set (negation triggers and their scope,
pseudo-negations, post-negations, hedges, normal phrasing, finding words). docs/NEGATION.md measures these
rules against medspaCy's ConText and negspaCy on tests/data/report_corpus.jsonl: the rules won, so the
package does not depend on spaCy.

Rules in one breath: a clause ends at ';', 'but', 'however', 'although', 'except' (and ', and' between two
predicates). A negation trigger ('no', 'without', 'negative for', ...) negates to the clause end; a
post-negation ('is not seen', 'has resolved') negates back to the clause start. An organ named inside a
negated span is normal in that clause; otherwise its clause is abnormal if the un-negated words hold a
finding or a hedge ('possible', 'cannot be excluded'), normal if they hold normal phrasing or any negation,
and abnormal when nothing says either way. An organ is abnormal if any of its clauses is.
"""

from __future__ import annotations

import dataclasses
import re

from ctglip_jax.data import organ_terms, organs
from ctglip_jax.errors import ReportError


@dataclasses.dataclass(frozen=True)
class OrganFinding:
    """What the report says about one organ: its sentences (report order) and whether it is abnormal."""

    text: str
    abnormal: bool


# ---------------------------------------------------------------------------------------------------------
# Decoding and sentence splitting.


def decode_report(raw: bytes, source: object) -> str:
    """Strict UTF-8 (a BOM is dropped); undecodable bytes raise ReportError naming the source."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ReportError(source, f"report is not valid UTF-8 (byte {e.start}: {e.reason})") from None


# Abbreviations whose period never ends a sentence; units ("cm.") end one only before a capital letter.
_ABBREVIATIONS = (
    r"e\.g|i\.e|approx|vs|dr|mr|mrs|ms|st|no|fig|incl|resp|cf|ca|et al|etc|sq|prox|ant|post|inf|sup|lat|med"
)
_BULLET = re.compile(r"^\s*(?:[-*•–·]|\(?\d{1,2}[.)]|\(?[a-z][.)](?=\s))\s*")
_INLINE_NUMBER = re.compile(r"(?:(?<=[.:;])|^)\s*\d{1,2}[.)]\s+(?=[A-Za-z])")
# A header word may hold a hyphen ("Dose-length product:", "Follow-up:"); " - " after it also ends a header.
_HEADER = re.compile(r"^([A-Za-z][A-Za-z /,&()'-]{0,48}?)(?:\s*:|\s+[-–]\s)\s*(.*)$", re.S)
# Sections that describe the request or the acquisition, not this scan's findings ("History: liver cancer").
_SKIPPED_SECTION = re.compile(
    r"(?:clinical\s+)?(?:history|indication|information|technique|comparison|examination|exam|procedure|protocol|"
    r"reason(?:\s+for\s+(?:exam|study))?|contrast|dose|dlp|ctdi\w*|priors?|signed|electronically\s+signed.*)",
    re.I,
)
# Words that mark an acquisition header wherever they sit in it ("Dose-length product", "Non-contrast
# technique", "CTDI-vol"); "contrast" alone is not one of them ("Post-contrast: the liver enhances ...").
_ACQUISITION_WORD = re.compile(
    r"\b(?:history|indications?|technique|comparisons?|protocol|dose|dlp|ctdi[\w-]*|kvp|signed)\b", re.I
)


def _skipped_section(header: str, organ_ids: tuple[int, ...]) -> bool:
    return not organ_ids and bool(_SKIPPED_SECTION.fullmatch(header) or _ACQUISITION_WORD.search(header))


@dataclasses.dataclass(frozen=True)
class _Sentence:
    text: str
    header_ids: tuple[int, ...]  # organs named by the section header it sits under


def _split_line(line: str) -> list[str]:
    """One line (no newlines) -> sentences, keeping decimals, abbreviations and levels ('L2.') intact."""
    line = _INLINE_NUMBER.sub("\n", line)
    out = []
    for piece in line.split("\n"):
        piece = _BULLET.sub("", piece).strip()
        if not piece:
            continue
        out.extend(s.strip() for s in _split_on_breaks(piece) if s.strip())
    return out


def _split_on_breaks(text: str) -> list[str]:
    """Cut after '.', '!' or '?' followed by a capital or digit, unless the period closes an abbreviation
    ('approx. 2 cm', 'e.g. Cysts'; 'No. 5' but not 'no.' ending a sentence). '1.2' has no space: no cut."""
    pieces, last = [], 0
    for m in re.finditer(r"[.!?]\s+(?=[\"'(]?[A-Z0-9])", text):
        word = re.search(r"([A-Za-z.]+)$", text[last : m.start()])
        if word and re.fullmatch(rf"(?:{_ABBREVIATIONS})\.?", word.group(1), re.I):
            is_number_sign = word.group(1).lower() == "no" and re.match(r"\s*\d", text[m.end() :])
            if word.group(1).lower() != "no" or is_number_sign:
                continue
        pieces.append(text[last : m.start() + 1])
        last = m.end()
    pieces.append(text[last:])
    return pieces


def _header_of(sentence: str) -> tuple[str | None, str]:
    """'Liver: Normal.' -> ('Liver', 'Normal.'); a long or numeric prefix is not a header."""
    m = _HEADER.match(sentence)
    if not m or len(m.group(1).split()) > 6:
        return None, sentence
    return m.group(1).strip(), m.group(2).strip()


def _segments(text: str) -> list[_Sentence]:
    """Sentences with the organs of the section header they sit under.

    An inline header ('Liver: ...') covers the rest of its line; a header alone on its line
    ('LUNGS AND PLEURA:') covers the lines below it up to a blank line or the next header. Sentences in
    request/acquisition sections (history, technique, comparison) are dropped.
    """
    out: list[_Sentence] = []
    block: tuple[tuple[int, ...], bool] = ((), False)  # (header organ ids, skipped section)
    for raw_line in text.splitlines():
        if not raw_line.strip():
            block = ((), False)
            continue
        line = block
        for sentence in _split_line(raw_line):
            kept = sentence
            while True:  # 'FINDINGS: Liver: ...' holds two headers
                header, rest = _header_of(kept)
                if header is None:
                    break
                organ_ids = _ids_in(header)
                line = (organ_ids, _skipped_section(header, organ_ids))
                if not rest:  # a header alone on its line
                    block, kept = line, ""
                    break
                if line[0] or _has_cue(header):
                    break  # keep an organ header ('Liver: Normal.') in the text
                kept = rest
            if kept and not line[1]:
                out.append(_Sentence(kept, line[0]))
    return out


def split_sentences(text: str) -> list[str]:
    """Report -> sentences, in order; section headers naming no organ ('FINDINGS:') are dropped."""
    return [s.text for s in _segments(text)]


# ---------------------------------------------------------------------------------------------------------
# Abnormality of a clause.

_CLAUSE_BREAK = re.compile(
    r";|\b(?:but|however|although|though|whereas|except(?:\s+for)?|with\s+the\s+exception\s+of|"
    r"apart\s+from|aside\s+from|other\s+than)\b",
    re.I,
)
_PREDICATE = re.compile(
    r"\b(?:is|are|was|were|has|have|there|shows?|demonstrates?|measures?|appears?)\b", re.I
)
_HEDGE = re.compile(
    r"\b(?:(?:can|could)\s*not\s+be\s+(?:excluded|ruled\s+out)|cannot\s+(?:be\s+)?(?:exclude[ds]?|ruled?\s+out)"
    r"|not\s+(?:be\s+)?(?:excluded|ruled\s+out)|possible|possibly|probable|probably|likely|suspicious\s+for|"
    r"suspected|suspect|concerning\s+for|suggestive\s+of|suggests?|may\s+represent|might\s+represent|"
    r"could\s+represent|may\s+reflect|questionable|equivocal|indeterminate|differential\s+includes|"
    r"versus|vs\.?|favou?red|presumed|worrisome\s+for)\b",
    re.I,
)
_PSEUDO_NEGATION = re.compile(
    r"\b(?:partially|under)[-\s]?disten(?:ded|sion|tion)\b|"
    r"\b(?:no|without)\s+(?:(?:significant|interval|appreciable|substantial|definite)\s+)*"
    r"(?:change|increase|decrease|growth|enlargement\s+of\s+the\s+known)\b|\bnot\s+only\b|"
    r"\bno\s+longer\s+(?:fully\s+)?(?:visualized|seen)\s+to\b|\bgram\s+negative\b",
    re.I,
)
_NEGATION = re.compile(
    r"\b(?:no|not|without|negative\s+for|free\s+of|absence\s+of|absent|never|neither|nor|"
    r"rule[sd]?\s+out|ruled\s+out|resolution\s+of|resolved|excluded)\b",
    re.I,
)
_POST_NEGATION = re.compile(
    r"\b(?:(?:is|are|was|were)\s+(?:no\s+longer|not)\s+(?:seen|visualized|identified|evident|present|"
    r"appreciated|demonstrated|detected)|(?:has|have)\s+(?:since\s+)?resolved|(?:is|are)\s+(?:now\s+)?"
    r"resolved|(?:is|are|was|were)\s+absent|(?:is|are|was|were|has\s+been|have\s+been)\s+(?:excluded|"
    r"ruled\s+out)|no\s+longer\s+(?:seen|visualized|present|identified))\b",
    re.I,
)
# "Bladder is well distended" is normal phrasing although "distended" alone is a finding.
_WELL_DISTENDED = re.compile(r"\b(?:well|adequately|appropriately|normally)[-\s]?distended\b", re.I)
# "The gallbladder is surgically absent" is a post-operative finding, not a negation.
_SURGICALLY_ABSENT = re.compile(
    r"\bsurgically\s+(?:absent|removed)\b|\b(?:absent|removed)\s+surgically\b", re.I
)
# After a negated list a comma + size/quantity word starts a new, positive statement:
# "No pneumothorax, small left effusion."
_NEGATION_END = re.compile(
    r",\s*(?=(?:mild|mildly|moderate|moderately|severe|small|large|trace|minimal|minor|a|an|there|stable|"
    r"new|unchanged|persistent|scattered|multiple|several|few|\d)\b)",
    re.I,
)
_NORMAL = re.compile(
    r"\b(?:unremarkable|normal(?:ly)?|within\s+normal\s+limits|wnl|patent|intact|clear|maintained|preserved|"
    r"well\s+distended|adequately\s+distended|appropriately\s+distended|symmetric(?:al|ally)?|"
    r"homogeneous(?:ly)?|smooth|physiologic|age[-\s]appropriate|no\s+abnormalit\w+|grossly\s+normal|"
    r"expected|satisfactory|limit\w*\s+(?:evaluation|assessment)|suboptimal\w*|"
    r"measur\w*\s+(?:approximately\s+|up\s+to\s+)?\d[\d.]*\s*(?:cm|mm))\b",
    re.I,
)
_FINDING = re.compile(
    r"(?:lesion|mass|nodul|cyst|stone|calcul|calcif|hypo(?:dens|attenuat|enhanc)|hyper(?:dens|attenuat|enhanc)|"
    r"enlarg|megaly|thicken|dilat|effusion|fractur|atelecta|consolidat|opacit|ground[-\s]glass|emphysem|"
    r"steatosis|fatty|cirrho|nodular|atroph|hernia|aneurysm|ectas|stenos|thromb|embol|occlu|diverticul|"
    r"inflam|stranding|collection|abscess|metasta|tumou?r|neoplas|carcinom|malignan|hydroneph|hydroureter|"
    r"adenoma|hemangioma|myelolipoma|scar|fibros|bronchiectas|degenerat|osteophyt|sclero|lytic|blastic|"
    r"compression|spondylo|listhesis|herniat|infarct|granuloma|plaque|atheroscler|edema|oedema|pneumothora|"
    r"air[-\s]fluid|obstruct|distended|distension|distention|hypertroph|pneumonia|infiltrat|lymphadenopath|"
    r"adenopath|ectomy|resect|post[-\s]?surgical|postoperative|status\s+post|s/p|deformit|wedg|collaps|"
    r"contusion|laceration|hematoma|haematoma|bleed|hemorrhag|pancreatitis|cholecystitis|colitis|itis\b|"
    r"lithiasis|sludge|wall\s+thickening|irregular|heterogene|prominent|prominence|tortuous|ectatic|"
    r"abnormal|cardiomegaly|pericardial\s+effusion|splenule|varic|ascites|pneumatosis|perforat|fistul|"
    r"erosion|destruct|sclerotic|schmorl|endplate|mucous|mucoid|tree[-\s]in[-\s]bud|honeycomb|reticulat|"
    r"bleb|bulla|cavit|loss\s+of\s+height|narrow|spur|enhancing|focus|foci|density|densities|"
    r"low[-\s]attenuation|hypoden|calcified|gas|straighten|reversal|kyphos|scolios)",
    re.I,
)


def _clauses(sentence: str) -> list[tuple[int, int]]:
    """Character spans of the clauses of a sentence (the gaps between clause breaks)."""
    breaks = [(m.start(), m.end()) for m in _CLAUSE_BREAK.finditer(sentence)]
    # ', and' / ', while' join two clauses only if both sides have their own predicate.
    for m in re.finditer(r",?\s+(?:and|while)\s+", sentence):
        prev_end = max([e for _, e in breaks if e <= m.start()], default=0)
        next_start = min([s for s, _ in breaks if s >= m.end()], default=len(sentence))
        if _PREDICATE.search(sentence[prev_end : m.start()]) and _PREDICATE.search(
            sentence[m.end() : next_start]
        ):
            breaks.append((m.start(), m.end()))
    spans, last = [], 0
    for start, end in sorted(breaks):
        if start > last:
            spans.append((last, start))
        last = max(last, end)
    if last < len(sentence):
        spans.append((last, len(sentence)))
    return spans


_HEDGE_MARK, _FINDING_MARK, _NORMAL_MARK = "\x01", "\x02", "\x03"  # characters no report contains


def _mask(clause: str) -> str:
    """The clause with hedges and post-surgical absence marked and pseudo-negations blanked; same length,
    so character spans still line up with the clause."""
    fill = lambda char: lambda m: char * len(m.group(0))
    clause = _PSEUDO_NEGATION.sub(fill(" "), clause)
    clause = _SURGICALLY_ABSENT.sub(fill(_FINDING_MARK), clause)
    clause = _WELL_DISTENDED.sub(fill(_NORMAL_MARK), clause)
    return _HEDGE.sub(fill(_HEDGE_MARK), clause)


def _negated_spans(clause: str) -> list[tuple[int, int]]:
    spans = []
    for m in _POST_NEGATION.finditer(clause):
        spans.append((0, m.end()))
    for m in _NEGATION.finditer(clause):
        if any(a <= m.start() < b for a, b in spans):
            continue
        end = _NEGATION_END.search(clause, m.end())
        spans.append((m.start(), end.start() if end else len(clause)))
    return spans


def _has_cue(text: str) -> bool:
    return bool(_NORMAL.search(text) or _FINDING.search(text) or _NEGATION.search(text))


def _clause_flags(clause: str) -> tuple[list[organ_terms.Mention], dict[int, bool]]:
    """Mentions of one clause and {organ id: abnormal} for this clause alone."""
    masked = _mask(clause)
    spans = _negated_spans(masked)
    free = "".join(" " if any(a <= i < b for a, b in spans) else ch for i, ch in enumerate(masked))
    clause_abnormal = _clause_abnormal(free, negated=bool(spans))
    inside = lambda m: any(a <= m.start and m.end <= b for a, b in spans)
    # 'No pneumothorax, small left pleural effusion': the explicit left side must not swallow the negated
    # family-wide 'pneumothorax', so explicit mentions win only within the same negation state.
    all_mentions = organ_terms.find_mentions(clause, prefer_explicit=False)
    mentions = [
        m
        for state in (True, False)
        for m in organ_terms.prefer_explicit_mentions([x for x in all_mentions if inside(x) == state])
    ]
    flags: dict[int, bool] = {}
    for mention in mentions:
        abnormal = False if inside(mention) else clause_abnormal
        for organ_id in mention.ids:
            flags[organ_id] = flags.get(organ_id, False) or abnormal
    return mentions, flags


def _clause_abnormal(free_text: str, *, negated: bool) -> bool:
    """Abnormal if un-negated words hold a finding or a hedge; normal if they (or a negation) say so."""
    if _HEDGE_MARK in free_text or _FINDING_MARK in free_text or _FINDING.search(free_text):
        return True
    if negated or _NORMAL_MARK in free_text or _NORMAL.search(free_text):
        return False
    return True


def _text_abnormal(text: str) -> bool:
    """Abnormality of a sentence that names no organ itself (it inherits its section header's organs)."""
    results = []
    for a, b in _clauses(text):
        masked = _mask(text[a:b])
        spans = _negated_spans(masked)
        free = "".join(" " if any(x <= i < y for x, y in spans) else ch for i, ch in enumerate(masked))
        if free.strip(" .,:") or spans:
            results.append(_clause_abnormal(free, negated=bool(spans)))
    return any(results)


def _ids_in(text: str) -> tuple[int, ...]:
    ids: dict[int, None] = {}
    for m in organ_terms.find_mentions(text):
        ids.update(dict.fromkeys(m.ids))
    return tuple(ids)


# ---------------------------------------------------------------------------------------------------------
# The parser.


def sentence_flags(sentence: str, header_ids: tuple[int, ...] = ()) -> dict[int, bool]:
    """{organ id: abnormal} for one sentence; organs named nowhere in it come from its header.

    An inline organ header ('Pleura: Small right effusion.') is a header, not a mention: the body is
    parsed on its own and only falls back to the header's organs (narrowed to a side the body names).
    """
    header, body = _header_of(sentence)
    header_organs = _ids_in(header) if header is not None else ()
    if not header_organs:
        body = sentence
    flags: dict[int, bool] = {}
    for a, b in _clauses(body):
        _, clause_flags = _clause_flags(body[a:b])
        for organ_id, abnormal in clause_flags.items():
            flags[organ_id] = flags.get(organ_id, False) or abnormal
    inherited = header_organs or header_ids
    if not flags and inherited:
        flags = dict.fromkeys(_same_side(inherited, body), _text_abnormal(body))
    return flags


def _same_side(ids: tuple[int, ...], sentence: str) -> tuple[int, ...]:
    """Under 'Kidneys:', 'Small stone on the right.' speaks of the right kidney only."""
    sides = {w.lower() for w in re.findall(r"\b(left|right)\b", sentence, re.I)}
    if len(sides) != 1 or re.search(r"\b(?:bilateral|both)\b", sentence, re.I):
        return ids
    side = sides.pop()
    names = organs.v1_names()
    kept = tuple(i for i in ids if re.search(rf"(?:^|_){side}(?:_|$)", names[i]))
    return kept or ids


def parse_report(text: str, *, source: object = "<report>") -> dict[str, OrganFinding]:
    """Report text -> {v1 organ name: OrganFinding}, organs in v1 id order; unmentioned organs are absent.

    Raises ReportError (naming `source`) for an empty report or one that names no known organ.
    """
    if not text or not text.strip():
        raise ReportError(source, "report is empty")
    texts: dict[int, list[str]] = {}
    abnormal: dict[int, bool] = {}
    for sentence in _segments(text):
        for organ_id, flag in sentence_flags(sentence.text, sentence.header_ids).items():
            texts.setdefault(organ_id, []).append(sentence.text)
            abnormal[organ_id] = abnormal.get(organ_id, False) or flag
    if not texts:
        raise ReportError(source, "report names no organ of the 104-class vocabulary")
    names = organs.v1_names()
    return {names[i]: OrganFinding(" ".join(texts[i]), abnormal[i]) for i in sorted(texts)}


def organ_sentences(text: str) -> list[tuple[str, str, bool]]:
    """Report text -> [(v1 organ name, sentence, abnormal)], sentence by sentence in report order.

    The same rules as `parse_report` (sections, headers, negation), kept per sentence instead of joined per
    organ: a sentence naming two organs gives one item per organ (v1 id order), each with its own flag. An
    empty report, or one naming no known organ, gives [] (no error: a corpus skips it).
    """
    if not text or not text.strip():
        return []
    names = organs.v1_names()
    out = []
    for sentence in _segments(text):
        flags = sentence_flags(sentence.text, sentence.header_ids)
        out.extend((names[i], sentence.text, flags[i]) for i in sorted(flags))
    return out
