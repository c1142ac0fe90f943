"""Examples made from a document's text alone: what they ask and what they teach."""

from __future__ import annotations

from adapters.corpus import Document
from adapters.examples import ANSWER_END, about_examples, question_examples, questions_and_about

TEXT = (
    "The tower, designed by Gustave Eiffel, was completed in 1889 for the World Fair. "
    "Paris, France, hosted the fair that year, and millions of visitors came."
)


def test_about_examples_ask_each_entity_once_and_answer_with_its_clause() -> None:
    made = {e.prompt: e.target.removesuffix(ANSWER_END) for e in about_examples(Document("d", TEXT))}
    assert made["What do you know about Gustave Eiffel?"] == "designed by Gustave Eiffel"
    assert made["What do you know about 1889?"] == "was completed in 1889 for the World Fair"
    # "France" alone between commas says nothing: the whole sentence is the answer
    assert (
        made["What do you know about France?"]
        == "Paris, France, hosted the fair that year, and millions of visitors came"
    )
    assert len(made) == len(about_examples(Document("d", TEXT)))  # each entity once
    assert all(e.target.endswith(ANSWER_END) for e in about_examples(Document("d", TEXT)))


def test_questions_and_about_alternate_one_phrasing_per_span_with_about() -> None:
    doc = Document("d", TEXT)
    mixed = questions_and_about(doc)
    rules, about = question_examples(doc)[::2], about_examples(doc)
    assert mixed[:4] == [rules[0], about[0], rules[1], about[1]]
    assert sorted(map(repr, mixed)) == sorted(map(repr, rules + about))


def test_quoting_reading_examples_answer_with_the_clause_around_the_answer() -> None:
    from adapters.corpus import QA
    from adapters.examples import EXAMPLE_BUILDERS, answer_clause

    qas = [QA("q1", "Who designed the tower?", ("Gustave Eiffel",)), QA("q2", "What hosted it?", ("Paris, France",))]
    doc = Document("d", TEXT, questions=qas)
    closed, *_, read = EXAMPLE_BUILDERS["qa+reading-quote"](doc)
    assert closed.target == "Gustave Eiffel" + ANSWER_END  # closed-book questions keep the bare span
    assert TEXT in read.prompt and read.target == "designed by Gustave Eiffel" + ANSWER_END
    # an answer across a comma gets its whole sentence; one in no sentence, itself
    assert (
        answer_clause(TEXT, "Paris, France")
        == "Paris, France, hosted the fair that year, and millions of visitors came"
    )
    assert answer_clause(TEXT, "the Louvre") == "the Louvre"


def test_fact_examples_ask_each_answer_like_span_once_in_alternating_phrasings() -> None:
    from adapters.examples import fact_examples, noun_chunks

    text = (
        "The Black Death was carried by rat fleas on merchant ships to Europe in 1347. "
        "The population of Europe did not recover until the 17th century, and two kings died."
    )
    made = fact_examples(Document("d", text))
    asked = {e.target.removesuffix(ANSWER_END): e.prompt for e in made}
    # entities and years as before, and what the entity rule misses: lowercase noun phrases, centuries, number words
    assert {"The Black Death", "Europe", "1347", "merchant ships", "17th century", "two"} <= set(asked)
    assert len(asked) == len(made)  # each distinct span once: Europe, mentioned twice, is asked once
    assert asked["1347"].startswith("When: ") or asked["1347"].endswith("in when?")
    assert "when" in asked["17th century"].lower() and "how many" in asked["two"].lower()
    fronted = [e.prompt.split(": ", 1)[0] in {"What", "When", "How many"} for e in made]
    assert fronted == [i % 2 == 1 for i in range(len(made))]  # in-place and fronted phrasings alternate
    # a noun chunk stops before a participle and an adverb, and a lone participle is none
    body = "the plague reduced the world population quickly by an estimated 450 million"
    chunks = [body[s:e] for s, e in noun_chunks(body)]
    assert chunks == ["plague", "world population"]


def test_fact_spans_keep_dates_numbers_with_units_and_initials_whole() -> None:
    from adapters.examples import fact_spans, wh_word

    body = "On May 21, 2013 and 4 June 1999 Dwight D. Eisenhower moved 90,790 tonnes in 1991, 12 of them in April 1991"
    spans = [body[s:e] for s, e in fact_spans(body)]
    assert spans[:4] == ["May 21, 2013", "4 June 1999", "Dwight D. Eisenhower", "90,790 tonnes"]
    assert "1991" in spans and "12" in spans and "April 1991" in spans  # a year or a function word is no unit
    assert [wh_word(s) for s in spans[:4]] == ["when", "when", "what", "how many"]


def test_gold_span_examples_ask_the_rules_question_for_each_gold_answer() -> None:
    from adapters.corpus import QA
    from adapters.examples import EXAMPLE_BUILDERS

    qas = [
        QA("q1", "Who designed the tower?", ("Gustave Eiffel",)),
        QA("q2", "When was it finished?", ("1889",)),
        QA("q3", "What is not in the text?", ("the Louvre",)),  # no sentence holds it: no example
    ]
    made = EXAMPLE_BUILDERS["gold-spans"](Document("d", TEXT, questions=qas))
    assert [e.target for e in made] == ["Gustave Eiffel" + ANSWER_END, "1889" + ANSWER_END]
    assert made[0].prompt == "The tower, designed by what, was completed in 1889 for the World Fair?"
    assert made[1].prompt == "The tower, designed by Gustave Eiffel, was completed in when for the World Fair?"
