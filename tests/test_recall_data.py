"""Recall sequences: facts stated at random depths of real training text and restated at the end, mixed into the
training stream at their share without moving the chat or text sequences around them."""

from __future__ import annotations

import random
import re

import datasets
import pytest
import torch

from linspec.data.documents import TrainingSet, load_documents, pack
from linspec.data.recall import RESTATE_HEADER, recall_sequence
from linspec.train.recipe import Chat, Data, Recall
from linspec.train.tiny import tiny_tokenizer

FACT = re.compile(r"The code for the (\w+ \w+) is (\d{5})\.")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def text(tokenizer):
    return pack(load_documents("builtin:sample"), tokenizer, 1024, 1)[0]


def test_facts_are_stated_inside_the_text_and_all_restated_in_another_order(tokenizer, text):
    sequence = recall_sequence(text, tokenizer, 8, random.Random(0))
    assert sequence.shape == text.shape and sequence.dtype == text.dtype
    decoded = tokenizer.decode(sequence)
    body, header, tail = decoded.partition(RESTATE_HEADER)
    assert header, "the sequence ends with the restated facts"
    stated, restated = FACT.findall(body), FACT.findall(tail)
    assert len(stated) == 8 and sorted(stated) == sorted(restated)  # every fact once before, once after
    assert stated != restated  # restated in a shuffled order: the position alone cannot give the code away
    assert len({label for label, _ in stated}) == 8  # distinct labels: each code has one answer
    # The rest of the body is the text itself, in order, from its first token.
    plain = body
    for label, code in stated:
        plain = plain.replace(f"\nThe code for the {label} is {code}.\n", "", 1)
    assert tokenizer.decode(text).startswith(plain)
    # Facts sit at many depths, some far from the end (where a window of recent tokens cannot see them).
    depths = [body.index(f"the {label} is") / len(decoded) for label, _ in stated]
    assert min(depths) < 0.3 and max(depths) > 0.5


def test_recall_sequences_are_a_function_of_their_seed_and_short_text_is_left_alone(tokenizer, text):
    first = recall_sequence(text, tokenizer, 4, random.Random("a"))
    assert torch.equal(first, recall_sequence(text, tokenizer, 4, random.Random("a")))
    assert not torch.equal(first, recall_sequence(text, tokenizer, 4, random.Random("b")))
    at_512 = tokenizer.decode(recall_sequence(text[:512], tokenizer, 8, random.Random(0)))
    assert len(FACT.findall(at_512)) == 2 * 4  # one fact per 128 tokens, each stated and restated
    short = text[:100]  # under 128 tokens: no room for a fact
    assert torch.equal(recall_sequence(short, tokenizer, 8, random.Random(0)), short)


def test_recall_takes_its_share_from_the_text_and_leaves_the_chat_positions_alone(tokenizer):
    documents = load_documents("builtin:sample")
    chat_documents = datasets.Dataset.from_dict(
        {"text": [f"user: question {i}? assistant: answer {i}." for i in range(40)]}
    )
    chat = Chat(ratio=0.25)
    plain = TrainingSet(documents, tokenizer, Data(seq_len=512, chat=chat), chat_documents)
    mixed = TrainingSet(documents, tokenizer, Data(seq_len=512, chat=chat, recall=Recall(ratio=0.25)), chat_documents)
    steps = [mixed.batch(step, 4, 512) for step in range(6)]
    rows = torch.cat(steps)
    before = torch.cat([plain.batch(step, 4, 512) for step in range(6)])
    _, chat_sequences = mixed.prepare(512)
    is_chat = [any(torch.equal(row, c) for c in chat_sequences) for row in rows]
    is_recall = [RESTATE_HEADER.strip() in tokenizer.decode(row) for row in rows]
    assert sum(is_chat) == 6 and sum(is_recall) == 6  # a quarter each of 24 rows
    assert not any(c and r for c, r in zip(is_chat, is_recall, strict=True))
    for row, old, chat_row in zip(rows, before, is_chat, strict=True):
        if chat_row:  # adding recall does not move the chat sequences
            assert torch.equal(row, old)
    assert torch.equal(mixed.batch(4, 4, 512), steps[4])  # a pure function of the step
