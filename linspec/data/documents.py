"""Text sources -> tokenised, packed sequences (through ``datasets``, cached by its fingerprints) -> batches.

The tokenised and packed tables live in the ``datasets`` cache (``HF_DATASETS_CACHE``, default
``$HF_HOME/datasets``), keyed by fingerprints of the files, the tokenizer and the sequence length.

Packing: documents are tokenised, joined with the tokenizer's EOS between them, and cut into sequences of exactly
``seq_len`` tokens (the remainder is dropped), so every sequence counts the same in a mean loss. Batches are a
pure function of (seed, step): resuming at step s yields the same sequences an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import torch

from linspec.data.corpus import BUILTIN, builtin_file
from linspec.data.recall import recall_sequence
from linspec.data.settings import Data
from linspec.errors import LinspecError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
LIST_FEATURES = ("Sequence", "List", "LargeList")  # datasets' list column types (List arrived in datasets 4)


def load_documents(source: str, text_field: str = "text", max_documents: int | None = None):
    """A ``datasets.Dataset`` with one ``text`` column for a local file/folder, ``builtin:NAME`` or ``hub:NAME``."""
    import datasets

    if source.startswith("hub:"):
        name, _, config = source[4:].partition(":")
        try:
            table = datasets.load_dataset(name, config or None, split="train")
        except Exception as error:  # network, unknown name: one line for the user
            raise LinspecError(f"could not load hub dataset {name!r}: {str(error).splitlines()[0]}") from None
    else:
        files = local_files(source)
        builder = BUILDERS[files[0].suffix]
        # .txt: one document per blank-line-separated paragraph block (``sample_by="paragraph"``).
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            with _quiet_datasets():
                table = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
        except Exception as error:  # datasets' own errors (malformed JSON, a bad parquet footer): one line
            raise LinspecError(f"{source}: cannot read it as {builder} data ({_root_cause(error)})") from None
    if max_documents is not None:
        table = table.select(range(min(max_documents, len(table)))).flatten_indices()
    if text_field not in table.column_names and "text" in table.column_names:
        text_field = "text"  # .txt files and builtins always use "text"
    if text_field not in table.column_names:
        raise LinspecError(f"{source}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
    table = table.select_columns([text_field])
    _check_text_column(table, source, text_field)
    return table if text_field == "text" else table.rename_column(text_field, "text")


def _check_text_column(table, source: str, field: str) -> None:
    """Refuse a column that is not a string in every row (``{"text": 5}``, lists, nulls) with the file and column
    named: the tokenizer would fail on it later with a message naming neither."""
    import datasets

    feature = table.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        if isinstance(feature, datasets.Value):
            found = f"{feature.dtype} values"
        elif isinstance(feature, (list, *(getattr(datasets, n) for n in LIST_FEATURES if hasattr(datasets, n)))):
            found = "lists"
        else:
            found = "values of mixed types"
        raise LinspecError(f"{source}: column {field!r} must hold text in every row; it holds {found}")
    missing = table.data.column(field).null_count
    if missing:
        raise LinspecError(f"{source}: column {field!r} is null in {missing} row(s); every row needs text")


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' own error logging while it reads a file: its failure becomes one LinspecError line,
    and the log would print the same problem again, with a traceback, above it."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause: ``datasets`` wraps the parser's message in a generic one."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def check_source(source: str, key: str) -> None:
    """Refuse a text source that cannot be read, before any work: an unknown ``builtin:`` name, an empty ``hub:``
    name, a missing path or a folder without text files. ``key`` names the setting in the one-line error."""
    if source.startswith("builtin:"):
        if source[len("builtin:") :] not in BUILTIN:
            raise LinspecError(f"{key}: unknown builtin {source!r}; known: {', '.join(BUILTIN)}")
    elif source.startswith("hub:"):
        if not source[4:]:
            raise LinspecError(f"{key}: hub: needs a dataset name")
    elif not Path(source).expanduser().exists():
        raise LinspecError(f"{key}: file not found: {source}")
    else:
        try:
            local_files(source)
        except LinspecError as error:
            raise LinspecError(f"{key}: {error}") from None


def local_files(source: str) -> list[Path]:
    """The data files a local or ``builtin:`` source names, checked: one known kind, not empty, text as UTF-8."""
    path = builtin_file(source[len("builtin:") :]) if source.startswith("builtin:") else Path(source).expanduser()
    if not path.exists():
        raise LinspecError(f"{source}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file()) if path.is_dir() else [path]
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) != 1:
        raise LinspecError(f"{source}: expected .txt, .jsonl, .json or .parquet file(s) of one kind")
    for file in files:
        if not file.is_file() or file.stat().st_size == 0:
            raise LinspecError(f"{file}: empty or not a regular file; it holds no text")
        if BUILDERS[file.suffix] != "parquet":
            with open(file, "rb") as handle:
                head = handle.read(1 << 16)
            try:
                head.decode("utf-8")
            except UnicodeDecodeError as error:
                if error.start < len(head) - 4:  # not just a character cut at the end of the sample
                    raise LinspecError(f"{file}: not UTF-8 text (byte {error.start}); is it a binary file?") from None
            if b"\0" in head:
                raise LinspecError(f"{file}: holds NUL bytes; is it a binary file?")
    return files


def pack(documents, tokenizer, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """``[N, seq_len]`` token ids: documents tokenised, joined with EOS, cut into full-length sequences."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [[*row, eos] for row in ids]}

    def chunk(batch):
        flat = [t for row in batch["ids"] for t in row]
        usable = len(flat) - len(flat) % seq_len
        return {"input_ids": [flat[i : i + seq_len] for i in range(0, usable, seq_len)]}

    tokenized = documents.map(tokenize, batched=True, remove_columns=["text"], desc="tokenising")
    # One batch for the whole corpus, so packing crosses document boundaries exactly as described above.
    packed = tokenized.map(chunk, batched=True, batch_size=None, remove_columns=["ids"], desc="packing")
    if len(packed) == 0:
        raise LinspecError(f"not enough text for one sequence of {seq_len} tokens")
    if max_sequences is not None:
        packed = packed.select(range(min(max_sequences, len(packed))))
    return torch.tensor(packed["input_ids"], dtype=torch.long)


def split_documents(data: Data):
    """``(train documents, held-out documents)``: the held-out ones come from ``data.eval`` or, when it is null,
    from ``eval_fraction`` of the training documents (split before packing, so no sequence straddles both)."""
    import datasets

    parts = [load_documents(source, data.text_field, data.max_documents) for source in data.train]
    train_docs = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if data.eval is None:
        held_out = math.ceil(len(train_docs) * data.eval_fraction)
        if len(train_docs) - held_out < 1:
            raise LinspecError(
                f"recipe key data.train: {len(train_docs)} document(s) are too few to hold out {data.eval_fraction:g} "
                "of them for evaluation; add text, or name held-out text in data.eval"
            )
        split = train_docs.train_test_split(test_size=data.eval_fraction, seed=data.seed, shuffle=True)
        return split["train"], split["test"]
    return train_docs, load_documents(data.eval, data.text_field)


def build_splits(data: Data, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train [N, L], eval [M, L])`` packed at ``data.seq_len``."""
    train_docs, eval_docs = split_documents(data)
    train = pack(train_docs, tokenizer, data.seq_len, data.max_train_sequences)
    return train, pack(eval_docs, tokenizer, data.seq_len, data.max_eval_sequences)


class TrainingSet:
    """The training sequences at every length a curriculum asks for, plain text, chat and recall (each optional
    but the text), and the batch of each optimiser step.

    Sequences of one length are packed once (``prepare``) and kept. A batch is a pure function of (seed, step,
    length): position ``p`` of the global stream (``step × batch_size + i``) is a chat sequence exactly when
    ``⌊(p+1)·ratio⌋ > ⌊p·ratio⌋``, so chat makes up ``ratio`` of every stretch of the stream; recall sequences
    are taken the same way from the positions chat leaves. Each pool is read in its own seeded order, epoch after
    epoch; a recall sequence is built from a text sequence of its own seeded order. Resuming at any step, across
    a change of length included, gives the sequences an uninterrupted run would have seen.
    """

    def __init__(self, documents, tokenizer, data: Data, chat_documents=None) -> None:
        self.documents = documents
        self.chat_documents = chat_documents
        self.tokenizer = tokenizer
        self.data = data
        self.ratio = Fraction(data.chat.ratio).limit_denominator(1000) if chat_documents is not None else Fraction(0)
        # The recall share is of the whole stream; it is drawn from what chat leaves.
        self.recall_ratio = Fraction(0)
        if data.recall is not None:
            self.recall_ratio = (Fraction(data.recall.ratio) / (1 - self.ratio)).limit_denominator(1000)
        self.packed: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def prepare(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(text [N, seq_len], chat [M, seq_len] or None)``, packed on first use."""
        if seq_len not in self.packed:
            text = pack(self.documents, self.tokenizer, seq_len, self.data.max_train_sequences)
            chat = None
            if self.chat_documents is not None:
                chat = pack(self.chat_documents, self.tokenizer, seq_len)
            self.packed[seq_len] = (text, chat)
        return self.packed[seq_len]

    def batch(self, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        """``[batch_size, seq_len]``: the sequences of optimiser step ``step`` (0-based), the same on every process."""
        text, chat = self.prepare(seq_len)
        if chat is None and not self.recall_ratio:
            return global_batch(text, step, batch_size, self.data.seed)
        positions = range(step * batch_size, (step + 1) * batch_size)
        return torch.stack([self.sequence(p, text, chat) for p in positions])

    def sequence(self, position: int, text: torch.Tensor, chat: torch.Tensor | None) -> torch.Tensor:
        """The sequence at ``position`` of the global stream."""
        seed = self.data.seed
        if chat is not None:
            is_chat, position = take_share(position, self.ratio)
            if is_chat:
                return nth_sequence(chat, position, seed)
        if self.recall_ratio:
            is_recall, position = take_share(position, self.recall_ratio)
            if is_recall:
                recall = self.data.recall
                rng = random.Random(f"{recall.seed}:{text.shape[1]}:{position}")
                # Its own order over the text (seed + 1), so recall rows do not repeat the plain rows beside them.
                return recall_sequence(nth_sequence(text, position, seed + 1), self.tokenizer, recall.facts, rng)
        return nth_sequence(text, position, seed)


def take_share(position: int, share: Fraction) -> tuple[bool, int]:
    """Whether ``position`` of a stream belongs to the pool that takes ``share`` of every stretch of it, and its
    index within that pool (when it does) or within the rest of the stream (when it does not)."""
    before = position * share.numerator // share.denominator  # pool positions among 0..position-1
    if (position + 1) * share.numerator // share.denominator > before:
        return True, before
    return False, position - before


def sequence_order(num_sequences: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of sequences in ``epoch``: a permutation fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_sequences, generator=generator)


def nth_sequence(sequences: torch.Tensor, index: int, seed: int) -> torch.Tensor:
    """The ``index``-th sequence of the stream that reads ``sequences`` epoch after epoch in seeded orders."""
    epoch, offset = divmod(index, sequences.shape[0])
    return sequences[sequence_order(sequences.shape[0], seed, epoch)[offset]]


def global_batch(sequences: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """``[batch_size, L]``: the sequences of optimiser step ``step`` (0-based), the same on every process."""
    n = sequences.shape[0]
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // n, positions % n
    orders = {int(e): sequence_order(n, seed, int(e)) for e in epochs.unique()}
    return sequences[torch.stack([orders[int(e)][o] for e, o in zip(epochs, offsets, strict=True)])]
