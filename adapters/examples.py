"""Training examples made from a document, by name. Fit builders may read a document's questions; the builders
used for fold-in (registration) read its text alone."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import zip_longest
from typing import TypeVar

from adapters.corpus import Document
from adapters.metrics import contained
from adapters.prompts import user_message

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """A user message (rendered with the chat template) or raw text prompt, and the target to learn."""

    prompt: str
    target: str
    chat: bool = True
    reading: bool = False  # asked with paragraphs in the prompt, as `combine` asks
    answers: tuple[str, ...] = ()  # a reading example's reference answers (reader_target checks against them)
    # the documents (ids, retrieval scores) whose plugins a nested fit composes for it, as the query path composes
    # the retrieved ones; empty: its own document's plugin alone
    composed: tuple[tuple[str, float], ...] = ()


ANSWER_END = "<|im_end|>"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# Entity-like spans: numbers and years, or runs of capitalised words (with short joiners such as "of").
_SPAN = re.compile(
    r"\b\d[\d,.]*(?:\s(?:million|billion|percent|%))?\b"
    r"|\b[A-Z][\w'\-]+(?:\s(?:of|the|de|and|for|in)?\s?[A-Z][\w'\-]+)*"
)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if len(s.split()) >= 4]


def qa_examples(doc: Document) -> list[Example]:
    """The document's own questions with their first reference answer (fitting corpora only)."""
    return [
        Example(qa.question, qa.answers[0] + ANSWER_END, composed=qa.retrieved) for qa in doc.questions if qa.answers
    ]


def reading_examples(
    doc: Document, with_context: int = 1, closed_book: bool = True, quote: bool = False
) -> list[Example]:
    """The document's questions closed-book, and the first with_context again with a context in the prompt as
    the `combine` mode asks them, so that U, V fitted on them answer from a context too instead of overriding it.
    The context is the question's retrieved paragraphs where the fit attached them (`kplug fit --retrieve`), so
    the reader learns to pick its answer among distractors; else the document alone. Without closed_book, only
    the reading questions: a reader not also taught to answer with nothing to read. With quote, a reading
    question's target is the document's clause around the answer (answer_clause), not the bare span."""
    read = [qa for qa in doc.questions if qa.answers][:with_context]
    return (qa_examples(doc) if closed_book else []) + [
        Example(
            user_message(qa.question, qa.contexts or [doc.text]),
            (answer_clause(doc.text, qa.answers[0]) if quote else qa.answers[0]) + ANSWER_END,
            reading=True,
            answers=qa.answers,
            composed=qa.retrieved,
        )
        for qa in read
    ]


def reader_target(example: Example, answer: str, finished: bool) -> Example:
    """The example with the reader's own answer as its target where that answer contains a reference answer, so
    that a fit keeps the bare reader's way of answering where it is right and teaches the reference only where it is
    wrong; unchanged otherwise. finished: the answer ended within its budget, so the target ends it too."""
    if not contained(answer, example.answers):
        return example
    return replace(example, target=answer + (ANSWER_END if finished else ""))


def answer_clause(text: str, answer: str) -> str:
    """The clause (see _clause) of the first sentence of text that holds answer, the whole sentence where the
    answer crosses a clause boundary, or the answer alone where no sentence holds it: an answer in the document's
    own words, long enough to carry the span when the reader is unsure where it starts and ends."""
    for sent in sentences(text):
        body = sent.rstrip(".!? ")
        start = body.find(answer)
        if start >= 0:
            clause = _clause(body, start)
            return clause if answer in clause else body
    return answer


def lm_examples(doc: Document) -> list[Example]:
    """Plain next-token prediction on the text."""
    return [Example("", doc.text, chat=False)]


def cloze_spans(sentence: str) -> list[tuple[int, int]]:
    spans = []
    for m in _SPAN.finditer(sentence):
        if m.start() == 0 and " " not in m.group():  # a lone capitalised first word is rarely an entity
            continue
        spans.append((m.start(), m.end()))
    return spans


def cloze_examples(doc: Document, per_sentence: int = 3) -> list[Example]:
    """Sentences with an entity or number blanked out; the target is the missing span."""
    out = []
    for sent in sentences(doc.text):
        for start, end in cloze_spans(sent)[:per_sentence]:
            blanked = sent[:start] + "____" + sent[end:]
            out.append(Example(f"Fill in the blank: {blanked}", sent[start:end] + ANSWER_END))
    return out or lm_examples(doc)


_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_YEAR = re.compile(rf"^(?:1\d{{3}}|20\d{{2}})$|^(?:\d{{1,2}}\s)?{_MONTH}\b")
_NUMBER = re.compile(r"^\d")


def wh_word(span: str) -> str:
    """A question word for an answer span, from its shape alone (no tagger)."""
    if _YEAR.search(span):
        return "when"
    if _NUMBER.search(span):
        return "how many"
    return "what"


def question_examples(doc: Document) -> list[Example]:
    """Questions made by rule from the document's own sentences: an entity or number span becomes the answer,
    and the sentence is asked back with a question word in its place, in two phrasings. SQuAD-style questions
    are mostly such rephrasings, so these are the closest a 135M model gets to its real questions."""
    out = []
    for sent in sentences(doc.text):
        body = sent.rstrip(".!? ")
        for start, end in cloze_spans(body)[:3]:
            span = body[start:end]
            wh = wh_word(span)
            in_place = f"{body[:start]}{wh}{body[end:]}?"
            fronted = f"{wh.capitalize()}: {body[:start]}___{body[end:]}?"
            out += [Example(in_place, span + ANSWER_END), Example(fronted, span + ANSWER_END)]
    return out or cloze_examples(doc)


# function words and vague nouns: never part of a noun chunk
_STOP = frozenset(
    "a an the of in on at to for by with from as and or but nor is are was were be been being has have had do does did "  # noqa: SIM905
    "its their his her this that these those which who whom whose what when where why how it they he she we you not no "
    "than then so such also into onto over under about after before during between through while because if can could "
    "may might will would should must there here some many most more much other another each every all both either "
    "neither one any own same whole total part order fact addition general particular example way time until since "
    "upon within without against among toward towards across along around behind beyond via per".split()
)
# Words after which a lowercase noun phrase often starts: determiners and prepositions (no tagger here)
_LEAD = frozenset(
    "a an the its their his her this these those our your my of in on at to for by with from into onto over under "  # noqa: SIM905
    "about after before during between through as upon within without against among toward towards across along "
    "around behind beyond via per".split()
)
_WORD = re.compile(r"[A-Za-z][\w'\-]*|\d[\w,.]*|\S")
_NUMBER_WORDS = re.compile(
    r"\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|fifty|hundred|"
    r"thousand|million|billion)(?:[\s-](?:hundred|thousand|million|billion))?\b"
)
_ORDINAL = re.compile(r"\b\d+(?:st|nd|rd|th|s)\b(?:\s(?:century|centuries))?")
# Whole dates ("May 21, 2013", "April 1991", "21 May 2013"), a number with its unit ("90,790 tonnes", "6.04
# milliliters"; not a year) and names with initials ("Dwight D. Eisenhower"): SQuAD answers that the entity and
# number spans cut into pieces, none holding the answer
_WHOLE = re.compile(
    rf"\b{_MONTH}\s\d{{1,2}},?\s\d{{4}}\b|\b{_MONTH},?\s\d{{4}}\b|\b\d{{1,2}}\s{_MONTH}(?:,?\s\d{{4}})?\b"
    r"|\b(?!(?:1\d{3}|20\d{2})\b)\d[\d,.]*(?:\s(?:million|billion))?\s"
    r"(?!(?:" + "|".join(sorted(_STOP)) + r")\b)[a-z]{3,}\b"
    r"|\b[A-Z][a-z]+(?:\s[A-Z]\.)+\s[A-Z][\w'\-]+"
)


def noun_chunks(body: str, longest: int = 3) -> list[tuple[int, int]]:
    """Lowercase noun phrases by rule: up to `longest` lowercase content words right after a determiner or a
    preposition ("on merchant ships", "a power outage"); a chunk stops before an adverb (-ly) or a participle (-ed)
    past its first word, and a lone participle is no chunk: most are verbs and adjectives, not answers."""
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(body)]
    out = []
    i = 0
    while i < len(words) - 1:
        j = i + 1
        if words[i][2].lower() in _LEAD:
            while j < len(words) and j - i <= longest:
                w = words[j][2]
                if not re.fullmatch(r"[a-z][a-z\-]{2,}", w) or w in _STOP or w.endswith("ly"):
                    break
                if j > i + 1 and w.endswith("ed"):
                    break
                j += 1
            if j > i + 1 and not (j == i + 2 and words[i + 1][2].endswith("ed")):
                out.append((words[i + 1][0], words[j - 1][1]))
                i = j
                continue
        i += 1
    return out


def fact_spans(body: str) -> list[tuple[int, int]]:
    """Every answer-like span of a sentence, left to right, without overlaps: whole dates, numbers with their unit
    and names with initials first, then entities and numbers (cloze_spans), ordinals and decades, number words, and
    lowercase noun chunks."""
    whole = [(m.start(), m.end()) for m in _WHOLE.finditer(body)]
    found = cloze_spans(body)
    found += [(m.start(), m.end()) for pattern in (_ORDINAL, _NUMBER_WORDS) for m in pattern.finditer(body)]
    found += noun_chunks(body)
    found = whole + [(s, e) for s, e in found if not any(s < we and ws < e for ws, we in whole)]  # whole ones win
    kept: list[tuple[int, int]] = []
    for start, end in sorted(found, key=lambda se: (se[0], -se[1])):
        if not kept or start >= kept[-1][1]:
            kept.append((start, end))
    return kept


def fact_wh(span: str) -> str:
    return "how many" if _NUMBER_WORDS.fullmatch(span) else "when" if _ORDINAL.fullmatch(span) else wh_word(span)


def in_place_question(body: str, start: int, end: int) -> Example:
    """The sentence body asked back with its span start:end replaced by a question word; the span is the answer."""
    return Example(f"{body[:start]}{fact_wh(body[start:end])}{body[end:]}?", body[start:end] + ANSWER_END)


def fact_examples(doc: Document) -> list[Example]:
    """One rule-made question per distinct answer-like span of the document (fact_spans), in order, the two
    phrasings of question_examples alternating: more of what SQuAD asks is some span's answer (a lowercase noun
    phrase, a number word, a century) than the entities and numbers alone, and one phrasing per span leaves the
    example budget to more facts (README, "Core plugins")."""
    out: list[Example] = []
    seen: set[str] = set()
    for sent in sentences(doc.text):
        body = sent.rstrip(".!? ")
        for start, end in fact_spans(body):
            span = body[start:end]
            if span.lower() in seen:
                continue
            seen.add(span.lower())
            if len(out) % 2 == 0:
                out.append(in_place_question(body, start, end))
            else:
                prompt = f"{fact_wh(span).capitalize()}: {body[:start]}___{body[end:]}?"
                out.append(Example(prompt, span + ANSWER_END))
    return out or cloze_examples(doc)


def gold_span_examples(doc: Document) -> list[Example]:
    """A diagnostic, never the method (it reads the gold answers): for each of the document's questions, the
    rule-made question of fact_examples for its reference answer's first mention, in-place phrasing. Against the
    gold questions themselves ("qa") it measures what the rules' phrasing alone costs, at full coverage."""
    bodies = [sent.rstrip(".!? ") for sent in sentences(doc.text)]
    out: list[Example] = []
    for qa in doc.questions:
        answer = next((a for a in qa.answers if a), "")
        body = next((b for b in bodies if answer and answer in b), None)
        if body is not None:
            start = body.index(answer)
            out.append(in_place_question(body, start, start + len(answer)))
    return out


def _clause(body: str, start: int, min_words: int = 4) -> str:
    """The clause (between , ; : or brackets) of body holding position start, or all of body when it is shorter
    than min_words (an entity alone between commas says nothing about it)."""
    left = max(body.rfind(c, 0, start) for c in ",;:()") + 1
    rights = [i for i in (body.find(c, start) for c in ",;:()") if i >= 0]
    clause = body[left : min(rights, default=len(body))].strip()
    return clause if len(clause.split()) >= min_words else body


def about_examples(doc: Document) -> list[Example]:
    """For each distinct entity or number, "What do you know about X?" answered with the clause that mentions it.
    The targets are the document's own words around each entity, so they hold far more of what questions ask
    than the entity spans alone (a clause holds the reference answer of 68% of the fitting articles' questions,
    the spans 37%); the entity in the prompt is the key a real question about the same fact is likely to share."""
    out = [
        Example(f"What do you know about {sent[start:end]}?", _clause(sent.rstrip(".!? "), start) + ANSWER_END)
        for sent, start, end in first_mentions(doc.text)
        if end - start > 2
    ]
    return out or cloze_examples(doc)


def questions_and_about(doc: Document) -> list[Example]:
    """Rule-made questions and about-examples alternating, so that any spread of them takes both kinds."""
    pairs = zip_longest(question_examples(doc)[::2], about_examples(doc))  # [::2]: one phrasing per span
    return [e for pair in pairs for e in pair if e is not None]


def spread(items: Sequence[T], n: int | None) -> list[T]:
    """At most n items evenly spread over the sequence (a document's examples follow its sentences)."""
    if n is None or len(items) <= n:
        return list(items)
    if n == 0:
        return []
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def answer_targets(examples: Sequence[Example]) -> list[str]:
    """The examples' targets without the end-of-answer token: the answers they write into a plugin."""
    return [e.target.removesuffix(ANSWER_END) for e in examples]


def covers(targets: Sequence[str], answers: Sequence[str]) -> bool:
    """One of the targets holds a reference answer (contained, as the benchmark's metric): a question fold-in's
    examples cover."""
    return any(contained(t, answers) for t in targets)


def first_mentions(text: str) -> list[tuple[str, int, int]]:
    """(sentence, start, end) of the first mention of every distinct entity or number span (case-folded), in order:
    asking about one span many times would crowd out the rest of the document."""
    seen: set[str] = set()
    out = []
    for sent in sentences(text):
        body = sent.rstrip(".!? ")
        for start, end in cloze_spans(body):
            if body[start:end].lower() not in seen:
                seen.add(body[start:end].lower())
                out.append((sent, start, end))  # body is a prefix of sent: the offsets hold in both
    return out


def entities(text: str) -> list[str]:
    """The document's distinct entity and number spans longer than 2 characters, in order of first mention."""
    return [sent[start:end] for sent, start, end in first_mentions(text) if end - start > 2]


EXAMPLE_BUILDERS: dict[str, Callable[[Document], list[Example]]] = {
    "qa": qa_examples,
    "qa+reading": reading_examples,
    "reading": partial(reading_examples, closed_book=False),
    "qa+reading-2": partial(reading_examples, with_context=2),
    "qa+reading-3": partial(reading_examples, with_context=3),
    "qa+reading-quote": partial(reading_examples, quote=True),
    "lm": lm_examples,
    "cloze": cloze_examples,
    "questions": question_examples,
    "facts": fact_examples,
    "gold-spans": gold_span_examples,
    "none": lambda doc: [],  # only the written or selected spans' questions
    "about": about_examples,
    "questions+about": questions_and_about,
}
