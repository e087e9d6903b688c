"""Token streams for training and evaluation: endless batches of LongTensor [batch_size, context_length].

This file is longer than the house's ~400 lines because it is the one place that turns every data
source a user has (the embedded corpus, text, token files, Hugging Face datasets, DataLoaders,
plain iterables) into one resumable stream with one set of checks.

A data spec is a small dict (from the YAML config or the CLI):

    {"source": "embedded"}                                 the embedded corpus (fastsae.model.embedded)
    {"source": "text", "path": "data/*.txt"}               local text file(s), one document each;
                                                           .jsonl files: one JSON object per line,
                                                           its "column" field (default "text") a document
    {"source": "tokens", "path": "train.bin"}              a flat token array: .npy, .pt, or .bin
                                                           (raw, headerless: "dtype" is required)
    {"source": "hf", "name": "roneneldan/TinyStories"}     a Hugging Face dataset; "data_files" a path,
                                                           a list, or a dict split -> path(s)

(Specs written before the rename name the source "kind": still read, with a DeprecationWarning.)

Text is tokenized without special tokens; each document ends with the tokenizer's EOS, and the
token sequence is cut into windows of context_length ("packing": no padding, every token counts).
Pre-tokenized Hugging Face data (an "input_ids" column, or SAELens' "tokens") is packed as-is.

"prepend_bos" (any source, default false): every window is the tokenizer's BOS followed by
context_length - 1 tokens of the stream, as TransformerLens' tokenize_and_concatenate and SAELens'
activation store build their batches. It is off by default because the packed stream already
separates documents with EOS (which is GPT-2's BOS), and SAELens' pretokenized datasets carry their
own BOS at the start of each row: a second one would shift every position. Turn it on for models
that expect BOS at position 0 (Gemma, Llama) when the data does not start windows with it.

Token ids are checked against the model's vocabulary (vocab_size) as batches are made: an id out
of range is an error naming the file or dataset and the id, not an IndexError deep in the model.

as_token_stream() adapts what a user passes to Trainer(dataset=...): a TokenStream, a
`datasets.Dataset` / `IterableDataset` (tokenized or text, packed like "hf" data and resumable), or
any iterable of batches (LongTensor [batch, ctx], or dicts with "input_ids" / "tokens", as a
DataLoader yields them).

Two kinds of stream:
- Local data (embedded, text, tokens) is finite: the windows are shuffled with a seeded permutation,
  a new one each epoch (seed + epoch), and the stream loops forever. state_dict() is the number of
  windows consumed, so a resumed run continues at exactly the same window.
- Hugging Face data is read in order (streaming by default), with an optional seeded shuffle buffer
  ("shuffle_buffer"). state_dict() holds the number of examples consumed and the tokens still
  buffered from the last one; resuming skips that many examples (streaming datasets re-read them,
  which costs time but not correctness) and restores the buffer. At the end the stream starts over
  (epoch + 1).

Splits: split="train" or "eval". embedded: the corpus' own held-out split. text / tokens: the last
"eval_fraction" (default 0.05) of the windows are eval, the rest train; eval is not shuffled.
hf: spec "split" (default "train") for train, spec "eval_split" for eval (default: the same split).
When both read the same split, "eval_examples" holds out its first N examples: eval reads only
those, train starts after them. Without either, eval data overlaps train data.
"""

from __future__ import annotations

import glob
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

SPEC_KEYS = {
    "embedded": {"source", "prepend_bos"},
    "text": {"source", "path", "column", "eval_fraction", "prepend_bos"},
    "tokens": {"source", "path", "dtype", "eval_fraction", "prepend_bos"},
    "hf": {"source", "name", "config", "split", "eval_split", "eval_examples", "column", "streaming", "data_files",
           "shuffle_buffer", "prepend_bos"},
}
SPLITS = ("train", "eval")
# Columns read as token ids when the spec names no column: HF's input_ids, SAELens' tokens.
TOKEN_COLUMNS = ("input_ids", "tokens")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")


def build_token_stream(
    spec: dict,
    tokenizer,
    *,
    context_length: int,
    batch_size: int,
    split: str = "train",
    seed: int = 0,
    vocab_size: int | None = None,
) -> "TokenStream":
    """A TokenStream for `spec` (see the module docstring). `tokenizer` (a HF tokenizer) is needed
    for text data and for prepend_bos; it may be None for pre-tokenized data. vocab_size: the
    model's vocabulary, to check token ids against (None: not checked)."""
    spec = _check_spec(spec)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_sizes(context_length, batch_size)
    bos = _bos_id(spec, tokenizer)
    source = spec["source"]
    if source == "hf":
        return HFTokenStream(spec, tokenizer, context_length=context_length, batch_size=batch_size, split=split,
                             seed=seed, vocab_size=vocab_size, bos=bos)

    if source == "embedded":
        from fastsae.model.embedded import embedded_corpus

        _require_tokenizer(tokenizer, source)
        tokens = tokenize_documents(embedded_corpus(split).split("\n\n"), tokenizer)
        return ArrayTokenStream(tokens, context_length=context_length, batch_size=batch_size, shuffle=split == "train",
                                seed=seed, vocab_size=vocab_size, sources=[(0, "the embedded corpus")], bos=bos)

    files = _expand(spec, "path")
    if source == "text":
        _require_tokenizer(tokenizer, source)
        column = spec.get("column", "text")
        tokens = tokenize_documents((doc for f in files for doc in read_documents(f, column)), tokenizer)
        sources = [(0, files[0] if len(files) == 1 else f"text files {spec['path']!r}")]
    else:
        tokens, sources = load_token_files(files, spec.get("dtype"))
    window = context_length - (bos is not None)
    windows = _split_windows(len(tokens) // window, spec.get("eval_fraction", 0.05), split)
    return ArrayTokenStream(
        tokens, context_length=context_length, batch_size=batch_size, shuffle=split == "train", seed=seed,
        windows=windows, vocab_size=vocab_size, sources=sources, bos=bos,
    )


def as_token_stream(data, tokenizer=None, *, context_length: int, batch_size: int, seed: int = 0,
                    vocab_size: int | None = None, prepend_bos: bool = False, name: str = "dataset",
                    exact_batches: bool = True):
    """What Trainer(dataset=...) accepts, as an iterable of LongTensor [batch, ctx] batches.

    A TokenStream is returned as it is. A `datasets.Dataset` / `IterableDataset` becomes a
    resumable stream packed like "hf" data (its "input_ids" / "tokens" column as token ids, else its
    "text" column tokenized). Anything else is taken as an iterable of batches: tensors
    [batch, ctx] or dicts holding one under "input_ids" / "tokens" (a DataLoader's batches); its
    batches are checked for shape and token ids as they come. `name` is the argument's name for
    error messages. exact_batches: a TokenStream must yield [batch_size, context_length] batches
    (training: they are the optimizer's batches; eval reads any).
    """
    if isinstance(data, TokenStream):
        if exact_batches and (data.batch_size, data.context_length) != (batch_size, context_length):
            raise ValueError(f"{name} is a TokenStream of [{data.batch_size}, {data.context_length}] batches; this run "
                             f"reads [{batch_size}, {context_length}] (batch size, data.context_length)")
        if vocab_size is not None and getattr(data, "vocab_size", 0) is None:
            data.vocab_size = vocab_size  # a stream built without the model: check its ids against it
        return data
    if _is_hf_dataset(data):
        _check_sizes(context_length, batch_size)
        spec = {"source": "hf", "prepend_bos": prepend_bos}
        return HFTokenStream(spec, tokenizer, context_length=context_length, batch_size=batch_size, split="train",
                             seed=seed, vocab_size=vocab_size, bos=_bos_id(spec, tokenizer), dataset=data,
                             label=f"the {type(data).__name__} passed as {name}")
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name} must be a TokenStream, a datasets.Dataset / IterableDataset, or an iterable of "
                        f"token batches (LongTensor [batch, ctx] or dicts with 'input_ids'), got {type(data).__name__}")
    return BatchIterable(data, vocab_size=vocab_size, name=name)


def _is_hf_dataset(data) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, (datasets.Dataset, datasets.IterableDataset))


# ---------------------------------------------------------------- spec checks


def _check_spec(spec) -> dict:
    if not isinstance(spec, dict):
        raise ValueError(f"data spec must be a dict with a 'source' key, got {type(spec).__name__}")
    if "kind" in spec:  # the key's name before the rename
        if "source" in spec and spec["source"] != spec["kind"]:
            raise ValueError(f"data spec gives both 'kind' ({spec['kind']!r}) and 'source' ({spec['source']!r}); "
                             "'kind' is the old name of 'source': keep only 'source'")
        warnings.warn("data spec key 'kind' is deprecated: it is now 'source' (read as 'source')", DeprecationWarning,
                      stacklevel=3)
        spec = {("source" if key == "kind" else key): value for key, value in spec.items()
                if not (key == "kind" and "source" in spec)}
    source = spec.get("source")
    if source not in SPEC_KEYS:
        raise ValueError(f"data spec 'source' must be one of {sorted(SPEC_KEYS)}, got {source!r}")
    unknown = set(spec) - SPEC_KEYS[source]
    if unknown:
        raise ValueError(
            f"unknown key(s) {sorted(unknown)} in data spec of source {source!r}; allowed: {sorted(SPEC_KEYS[source])}"
        )
    if source in ("text", "tokens") and "path" not in spec:
        raise ValueError(f"data spec of source {source!r} needs 'path' (a file, a directory or a glob)")
    if source == "hf" and "name" not in spec:
        raise ValueError("data spec of source 'hf' needs 'name' (a dataset name, a builder like 'json', or a local dir)")
    if "eval_fraction" in spec and not 0 < spec["eval_fraction"] < 1:
        raise ValueError(f"data spec 'eval_fraction' must be in (0, 1), got {spec['eval_fraction']!r}")
    if not isinstance(spec.get("prepend_bos", False), bool):
        raise ValueError(f"data spec 'prepend_bos' must be true or false, got {spec['prepend_bos']!r}")
    files = spec.get("data_files")
    if files is not None and not _is_paths(files) and not (
            isinstance(files, dict) and all(isinstance(k, str) and _is_paths(v) for k, v in files.items())):
        raise ValueError("data spec 'data_files' must be a path, a list of paths, or a dict of split name -> "
                         f"path(s), got {files!r}")
    return spec


def _is_paths(value) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))


def _check_sizes(context_length, batch_size) -> None:
    for name, value in (("context_length", context_length), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _bos_id(spec: dict, tokenizer) -> int | None:
    """The BOS id each window starts with, or None without prepend_bos."""
    if not spec.get("prepend_bos", False):
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("data spec 'prepend_bos' needs the model's tokenizer and its bos_token_id "
                         f"(got {'no tokenizer' if tokenizer is None else 'a tokenizer without bos_token_id'})")
    return int(bos)


def _require_tokenizer(tokenizer, source: str) -> None:
    if tokenizer is None:
        raise ValueError(f"data source {source!r} is text: pass the model's tokenizer (got None)")


def _expand(spec: dict, key: str) -> list[str]:
    path = str(spec[key])
    if Path(path).is_dir():
        files = sorted(str(p) for p in Path(path).iterdir() if p.is_file())
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise ValueError(f"data spec {key!r}={path!r} matches no file")
    return files


def _split_windows(n_windows: int, eval_fraction: float, split: str) -> np.ndarray:
    """Window indices of a split: the last eval_fraction of the windows are eval."""
    n_eval = max(1, int(round(n_windows * eval_fraction))) if n_windows > 1 else 0
    if split == "eval":
        if n_eval == 0:
            raise ValueError(f"the data has {n_windows} window(s) of context_length tokens: too few to hold out eval data")
        return np.arange(n_windows - n_eval, n_windows)
    return np.arange(0, n_windows - n_eval)


# ---------------------------------------------------------------- tokens


def tokenize_documents(documents, tokenizer) -> np.ndarray:
    """Each document's tokens followed by EOS, concatenated (int64)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id, which separates documents when packing")
    out: list[int] = []
    for doc in documents:
        out.extend(tokenizer.encode(doc, add_special_tokens=False))
        out.append(eos)
    return np.asarray(out, dtype=np.int64)


def read_documents(path: str, column: str = "text") -> list[str]:
    """The documents of a text file: the whole file, or for JSON lines (.jsonl / .ndjson) the
    `column` field of each line's object."""
    if Path(path).suffix not in JSON_LINES_SUFFIXES:
        return [Path(path).read_text(encoding="utf-8")]
    import json

    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object per line ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get(column), str):
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{number}: expected an object with a text field {column!r} "
                                 f"(data spec 'column'), got {keys}")
            docs.append(record[column])
    return docs


def load_token_file(files: list[str], dtype: str | None = None) -> np.ndarray:
    """A flat token array from .npy (memory-mapped), .pt (a 1-D tensor) or raw .bin files (which
    have no header, so their dtype must be given)."""
    return load_token_files(files, dtype)[0]


def load_token_files(files: list[str], dtype: str | None = None) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """(the files' tokens concatenated, [(offset of each file's first token, file name)])."""
    arrays, sources, offset = [], [], 0
    for f in files:
        suffix = Path(f).suffix
        if suffix == ".npy":
            arr = np.load(f, mmap_mode="r")
        elif suffix == ".pt":
            arr = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(arr, torch.Tensor):
                raise ValueError(f"{f}: expected a tensor of token ids, got {type(arr).__name__}")
            arr = arr.numpy()
        elif suffix == ".bin":
            arr = _load_bin(f, dtype)
        else:
            raise ValueError(f"token file {f!r}: suffix must be one of .npy, .pt, .bin")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{f}: expected a flat integer token array, got shape {arr.shape} dtype {arr.dtype}")
        arrays.append(arr)
        sources.append((offset, f))
        offset += len(arr)
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), sources


def _load_bin(path: str, dtype: str | None) -> np.ndarray:
    # A raw file does not say how wide its ids are: uint32 ids read as uint16 are valid-looking
    # garbage, so the width is never guessed.
    if dtype is None:
        raise ValueError(f"{path} is a raw token file without a header: set data.dtype to its integer type "
                         "(uint16 for nanoGPT-style GPT-2 files, uint32 or int32 for vocabularies over 65,536)")
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        np_dtype = None
    if np_dtype is None or not np.issubdtype(np_dtype, np.integer):
        raise ValueError(f"data.dtype={dtype!r} is not an integer dtype (e.g. uint16, uint32, int32, int64)")
    size = Path(path).stat().st_size
    if size % np_dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} tokens; is data.dtype right?")
    return np.memmap(path, dtype=np_dtype, mode="r")


def _out_of_vocab(ids: np.ndarray, vocab_size: int | None):
    """The first id of `ids` outside [0, vocab_size), or None."""
    if vocab_size is None or ids.size == 0:
        return None
    ids = ids.reshape(-1)
    bad = (ids < 0) | (ids >= vocab_size)
    return int(ids[bad.argmax()]) if bad.any() else None


# ---------------------------------------------------------------- streams


class TokenStream:
    """Endless iterator of LongTensor [batch_size, context_length]; resumable via state_dict()."""

    context_length: int
    batch_size: int
    epoch: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class ArrayTokenStream(TokenStream):
    """Windows of a finite token array, in a seeded permutation per epoch (or in order).

    sources: [(offset, name)] of the files the array was concatenated from, to name the file
    when a token id is out of the vocabulary. bos: an id each window starts with (its window then
    takes context_length - 1 tokens of the array), or None.
    """

    def __init__(self, tokens, *, context_length: int, batch_size: int, shuffle: bool, seed: int = 0, windows=None,
                 vocab_size: int | None = None, sources: list[tuple[int, str]] | None = None,
                 bos: int | None = None):
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.vocab_size = vocab_size
        self.sources = sources or [(0, "the token array")]
        self.bos = bos
        self.window = context_length - (bos is not None)  # tokens taken from the array per window
        if self.window < 1:
            raise ValueError(f"context_length must be at least 2 with prepend_bos, got {context_length}")
        self.windows = np.arange(len(tokens) // self.window) if windows is None else np.asarray(windows)
        if len(self.windows) == 0:
            raise ValueError(
                f"the data has {len(tokens)} tokens: fewer than one window of context_length={context_length}"
            )
        self.consumed = 0  # windows handed out so far, over all epochs
        self._order_epoch, self._order = -1, None

    @property
    def epoch(self) -> int:
        """The epoch of the last window handed out (0 until the data wraps around), as for hf."""
        return max(0, self.consumed - 1) // len(self.windows)

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = self.windows[torch.randperm(len(self.windows), generator=g).numpy()]
            else:
                self._order = self.windows
            self._order_epoch = epoch
        return self._order

    def __next__(self) -> torch.Tensor:
        W = self.window
        rows = []
        for _ in range(self.batch_size):  # a batch may straddle two epochs
            n = len(self.windows)
            w = self._order_for(self.consumed // n)[self.consumed % n]
            row = np.asarray(self.tokens[w * W : (w + 1) * W], dtype=np.int64)
            bad = _out_of_vocab(row, self.vocab_size)
            if bad is not None:
                position = w * W + int(np.flatnonzero(row == bad)[0])
                start, name = max((s for s in self.sources if s[0] <= position), key=lambda s: s[0])
                raise ValueError(f"{name}: token id {bad} at position {position - start} is outside the model's "
                                 f"vocabulary of {self.vocab_size} (wrong tokenizer or data.dtype?)")
            rows.append(row)
            self.consumed += 1
        batch = torch.from_numpy(np.stack(rows))
        if self.bos is not None:
            batch = torch.cat([torch.full((len(rows), 1), self.bos, dtype=torch.long), batch], dim=1)
        return batch

    def state_dict(self) -> dict:
        return {"kind": "array", "windows_consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "array":
            raise ValueError(f"state is not from a local-data token stream: {state!r}")
        self.consumed = int(state["windows_consumed"])
        self.seed = int(state.get("seed", self.seed))
        self._order_epoch = -1


class HFTokenStream(TokenStream):
    """Examples of a Hugging Face dataset, tokenized (or taken as input_ids) and packed in order."""

    def __init__(self, spec: dict, tokenizer, *, context_length: int, batch_size: int, split: str, seed: int,
                 vocab_size: int | None = None, bos: int | None = None, dataset=None, label: str | None = None):
        self.spec = spec
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.vocab_size = vocab_size
        self.bos = bos
        if context_length - (bos is not None) < 1:
            raise ValueError(f"context_length must be at least 2 with prepend_bos, got {context_length}")
        self.dataset = dataset  # a datasets.Dataset / IterableDataset given directly, else opened from the spec
        files = f" (data_files {spec['data_files']!r})" if spec.get("data_files") else ""
        self.label = label or f"dataset {spec.get('name')!r}{files}"
        # None: the first token column present (TOKEN_COLUMNS), else "text".
        self.column = spec.get("column")
        train_split = spec.get("split", "train")
        eval_split = spec.get("eval_split", train_split)
        self.hf_split = train_split if split == "train" else eval_split
        # The held-out head of a shared split: eval reads examples [0, holdout), train [holdout, end).
        holdout = int(spec.get("eval_examples") or 0)
        if holdout and eval_split != train_split:
            raise ValueError(f"data spec 'eval_examples' holds out examples of a split shared by train and eval; "
                             f"here eval_split={eval_split!r} differs from split={train_split!r}: drop one of them")
        self.holdout_skip = holdout if split == "train" else 0
        self.holdout_take = holdout if split != "train" else 0
        self.epoch = 0
        self.examples_consumed = 0
        self.buffer: list[int] = []
        self._iterator = None
        self._pretokenized = None

    def _open(self):
        import datasets

        spec = self.spec
        name = str(spec.get("name"))
        streaming = spec.get("streaming", True)
        saved = Path(name)
        if self.dataset is not None:
            ds = self.dataset
            streaming = isinstance(ds, datasets.IterableDataset)
        elif (saved / "dataset_info.json").exists() or (saved / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(name)  # a dataset saved with save_to_disk
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[self.hf_split]
            if streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(
                name, spec.get("config"), split=self.hf_split, streaming=streaming, data_files=spec.get("data_files")
            )
        # Hold out before shuffling, so train and eval never share an example.
        if self.holdout_skip:
            ds = ds.skip(self.holdout_skip) if streaming else ds.select(range(min(self.holdout_skip, len(ds)), len(ds)))
        if self.holdout_take:
            ds = ds.take(self.holdout_take) if streaming else ds.select(range(min(self.holdout_take, len(ds))))
        if spec.get("shuffle_buffer"):
            if streaming:
                ds = ds.shuffle(seed=self.seed + self.epoch, buffer_size=int(spec["shuffle_buffer"]))
            else:
                ds = ds.shuffle(seed=self.seed + self.epoch)
        columns = ds.column_names
        if columns is not None:  # streaming datasets may not know their columns before reading
            self._pick_column(columns)
        if self.examples_consumed:
            ds = ds.skip(self.examples_consumed) if streaming else ds.select(range(self.examples_consumed, len(ds)))
        return iter(ds)

    def _pick_column(self, columns) -> None:
        if self.column is None:
            self.column = next((c for c in TOKEN_COLUMNS if c in columns), "text")
        if self.column not in columns:
            raise ValueError(f"{self.label} has no column {self.column!r} (data spec 'column'); columns: {list(columns)}")

    def _tokens_of(self, example: dict) -> list[int]:
        if self._pretokenized is None:
            self._pick_column(list(example))
            self._pretokenized = not isinstance(example[self.column], str)
        value = example[self.column]
        if self._pretokenized:  # used as-is: packed, no EOS added
            ids = value.tolist() if hasattr(value, "tolist") else list(value)
            bad = _out_of_vocab(np.asarray(ids, dtype=np.int64), self.vocab_size)
            if bad is not None:
                raise ValueError(f"{self.label}: token id {bad} in column {self.column!r} of example "
                                 f"{self.examples_consumed} (split {self.hf_split!r}) is outside the model's "
                                 f"vocabulary of {self.vocab_size} (data tokenized for another model?)")
            return ids
        _require_tokenizer(self.tokenizer, "hf (text column)")
        return self.tokenizer.encode(value, add_special_tokens=False) + [self.tokenizer.eos_token_id]

    def _next_window(self) -> list[int]:
        T = self.context_length - (self.bos is not None)
        while len(self.buffer) < T:
            if self._iterator is None:
                self._iterator = self._open()
            try:
                example = next(self._iterator)
            except StopIteration:
                if self.examples_consumed == 0:
                    raise ValueError(f"{self.label} split {self.hf_split!r} is empty") from None
                self.epoch += 1
                self.examples_consumed = 0
                self._iterator = None
                continue
            self.buffer.extend(self._tokens_of(example))
            self.examples_consumed += 1
        window, self.buffer = self.buffer[:T], self.buffer[T:]
        return window if self.bos is None else [self.bos] + window

    def __next__(self) -> torch.Tensor:
        return torch.tensor([self._next_window() for _ in range(self.batch_size)], dtype=torch.long)

    def state_dict(self) -> dict:
        return {
            "kind": "hf",
            "epoch": self.epoch,
            "examples_consumed": self.examples_consumed,
            "buffer": list(self.buffer),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "hf":
            raise ValueError(f"state is not from a Hugging Face token stream: {state!r}")
        self.epoch = int(state["epoch"])
        self.examples_consumed = int(state["examples_consumed"])
        self.buffer = list(state["buffer"])
        self.seed = int(state.get("seed", self.seed))
        self._iterator = None  # reopened lazily, skipping the consumed examples


class BatchIterable:
    """A user's iterable of token batches (tensors, or dicts as a DataLoader yields them) as
    LongTensor [batch, ctx] batches, each checked for shape and token ids. Re-iterable when the
    wrapped iterable is (each iter() starts it again), which is what exact resume needs."""

    def __init__(self, batches, *, vocab_size: int | None = None, name: str = "dataset"):
        self.batches = batches
        self.vocab_size = vocab_size
        self.name = name

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index, batch in enumerate(self.batches):
            yield self._tokens(batch, index)

    def _tokens(self, batch, index: int) -> torch.Tensor:
        if isinstance(batch, dict):
            key = next((k for k in TOKEN_COLUMNS if k in batch), None)
            if key is None:
                raise ValueError(f"{self.name}: batch {index} is a dict without a token column "
                                 f"({' or '.join(TOKEN_COLUMNS)}); keys: {list(batch)}")
            batch = batch[key]
        if not isinstance(batch, torch.Tensor):
            try:
                batch = torch.as_tensor(np.asarray(batch))
            except (TypeError, ValueError):
                raise ValueError(f"{self.name}: batch {index} must be token ids [batch, ctx], got "
                                 f"{type(batch).__name__}") from None
        if batch.ndim != 2 or batch.dtype.is_floating_point or batch.dtype.is_complex or batch.dtype == torch.bool:
            raise ValueError(f"{self.name}: batch {index} must be an integer tensor [batch, ctx], got shape "
                             f"{list(batch.shape)} dtype {batch.dtype}")
        if self.vocab_size is not None and batch.device.type == "cpu":  # a GPU batch would cost a sync
            bad = _out_of_vocab(batch.numpy(), self.vocab_size)
            if bad is not None:
                raise ValueError(f"{self.name}: batch {index} holds token id {bad}, outside the model's "
                                 f"vocabulary of {self.vocab_size}")
        return batch.long()
