"""The data sections of a training recipe (``data:``, ``data.chat:``, ``data.recall:``, a drafter stage's
``drafter.data:``): what a run reads.

They live with the code that reads them, so ``linspec.data`` needs nothing from the training package above it;
the recipe (``linspec.train.recipe``) uses them as its sections, and its ``--help`` reads their field comments.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Data:
    """Text in, packed token sequences out. Sources: a local .txt/.jsonl/.json/.parquet file or folder,
    ``builtin:NAME`` (wiki-en, wiki-en-eval: a Wikipedia sample fetched once into the linspec cache; sample: a
    few KB shipped with linspec), or ``hub:NAME[:CONFIG]`` (needs network)."""

    train: list[str] = field(default_factory=lambda: ["builtin:wiki-en"])  # training sources
    eval: str | None = "builtin:wiki-en-eval"  # held-out source; null: hold out eval_fraction of train documents
    eval_fraction: float = 0.05  # share of documents held out when eval is null
    text_field: str = "text"  # column holding the text in jsonl/parquet/hub data
    seq_len: int = 256  # tokens per packed training sequence
    max_documents: int | None = None  # use only the first N documents of each source (null: all)
    max_train_sequences: int | None = None  # cap on packed training sequences (null: all)
    max_eval_sequences: int = 64  # packed held-out sequences used for perplexity
    seed: int = 0  # shuffling seed (order of sequences in each epoch)
    chat: Chat | None = None  # the original model's own answers to instruction prompts, mixed in (null: none)
    recall: Recall | None = None  # text with facts stated far back and asked for at the end, mixed in (null: none)


@dataclass
class Chat:
    """Chat data: the original model's own answers to instruction prompts, mixed with the plain text.

    Prompts are built from a corpus, answered once by the original model in its chat template and cached on disk.
    Distilling on them keeps an instruct model an instruct model; plain text alone restores language modelling
    but not instruction following."""

    prompts: str = "builtin:wiki-en"  # corpus the instruction prompts are built from (never the eval source)
    num_prompts: int = 128  # prompts answered by the original model (once; cached)
    max_new_tokens: int = 128  # length limit of each answer
    temperature: float = 0.0  # 0: greedy answers; > 0: sampled at this temperature
    seed: int = 0  # which paragraphs become prompts, and the sampling seed
    batch_size: int = 16  # prompts answered together while generating
    ratio: float = 0.25  # share of training sequences taken from the chat data (the rest: data.train)


@dataclass
class Recall:
    """Recall data: training text with short facts ("The code for the red fox is 40213.") inserted at random
    depths and all of them restated, in another order, at the end.

    Plain text rarely makes a model fetch an exact token from thousands of tokens back, so distillation on it
    never asks a hybrid's softmax layers to retrieve past the linear layers' window. Restating the facts does:
    each code's digits can only come from its first statement, and the teacher's logits there are retrieval."""

    ratio: float = 0.1  # share of training sequences that are recall sequences (taken from the plain-text share)
    facts: int = 8  # facts per sequence (fewer in short sequences: at most one per 128 tokens)
    seed: int = 0  # which labels and codes, and where they go


@dataclass
class DistillData:
    """Self-distillation data: the target's own greedy continuations of instruction prompts built from a corpus,
    and its final hidden states on them; cached in linspec's cache, keyed by target and these settings."""

    prompts: str = "builtin:wiki-en"  # builtin:NAME, a corpus file, or prompts verbatim (.txt lines, .jsonl "prompt")
    prompt_kinds: list[str] | None = None  # kinds built from a corpus in turn (data.prompts.KINDS; null: TEMPLATES)
    num_prompts: int = 96  # training prompts
    eval_prompts: int = 8  # held-out prompts for the per-depth accuracy
    max_new_tokens: int = 96  # continuation length per prompt
    batch_size: int = 16  # prompts generated together
    seed: int = 0  # which paragraphs become prompts (and which text windows are read)
    text: str = "builtin:wiki-en"  # plain text the target reads in parallel, labelled with its own next-token choice
    text_tokens: int = 0  # tokens of it (0: none); ~7x cheaper per position than generating continuations
    text_length: int = 256  # tokens per text window (the context the target sees when labelling)
