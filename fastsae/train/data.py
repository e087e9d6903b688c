"""Token streams for training and evaluation: endless batches of LongTensor [batch_size, context_length].

A data spec is a small dict (from the YAML config or the CLI):

    {"kind": "embedded"}                                   the embedded corpus (fastsae.model.embedded)
    {"kind": "text", "path": "data/*.txt"}                 local text file(s), one document each
    {"kind": "tokens", "path": "train.bin"}                a flat token array: .npy, .pt, or .bin
                                                           (raw uint16 like nanoGPT; "dtype" to change)
    {"kind": "hf", "name": "roneneldan/TinyStories"}       a Hugging Face dataset

Text is tokenized without special tokens; each document ends with the tokenizer's EOS, and the
token sequence is cut into windows of context_length ("packing": no padding, every token counts).

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
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

SPEC_KEYS = {
    "embedded": {"kind"},
    "text": {"kind", "path", "eval_fraction"},
    "tokens": {"kind", "path", "dtype", "eval_fraction"},
    "hf": {"kind", "name", "config", "split", "eval_split", "eval_examples", "column", "streaming", "data_files",
           "shuffle_buffer"},
}
SPLITS = ("train", "eval")


def build_token_stream(
    spec: dict,
    tokenizer,
    *,
    context_length: int,
    batch_size: int,
    split: str = "train",
    seed: int = 0,
) -> "TokenStream":
    """A TokenStream for `spec` (see the module docstring). `tokenizer` (a HF tokenizer) is needed
    for text data; it may be None for pre-tokenized data."""
    spec = _check_spec(spec)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value in (("context_length", context_length), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    kind = spec["kind"]
    if kind == "hf":
        return HFTokenStream(spec, tokenizer, context_length=context_length, batch_size=batch_size, split=split, seed=seed)

    if kind == "embedded":
        from fastsae.model.embedded import embedded_corpus

        _require_tokenizer(tokenizer, kind)
        tokens = tokenize_documents(embedded_corpus(split).split("\n\n"), tokenizer)
        return ArrayTokenStream(tokens, context_length=context_length, batch_size=batch_size, shuffle=split == "train", seed=seed)

    if kind == "text":
        _require_tokenizer(tokenizer, kind)
        files = _expand(spec, "path")
        tokens = tokenize_documents((Path(f).read_text(encoding="utf-8") for f in files), tokenizer)
    else:
        tokens = load_token_file(_expand(spec, "path"), spec.get("dtype", "uint16"))
    windows = _split_windows(len(tokens) // context_length, spec.get("eval_fraction", 0.05), split)
    return ArrayTokenStream(
        tokens, context_length=context_length, batch_size=batch_size, shuffle=split == "train", seed=seed, windows=windows
    )


# ---------------------------------------------------------------- spec checks


def _check_spec(spec) -> dict:
    if not isinstance(spec, dict):
        raise ValueError(f"data spec must be a dict with a 'kind' key, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in SPEC_KEYS:
        raise ValueError(f"data spec 'kind' must be one of {sorted(SPEC_KEYS)}, got {kind!r}")
    unknown = set(spec) - SPEC_KEYS[kind]
    if unknown:
        raise ValueError(
            f"unknown key(s) {sorted(unknown)} in data spec of kind {kind!r}; allowed: {sorted(SPEC_KEYS[kind])}"
        )
    if kind in ("text", "tokens") and "path" not in spec:
        raise ValueError(f"data spec of kind {kind!r} needs 'path' (a file, a directory or a glob)")
    if kind == "hf" and "name" not in spec:
        raise ValueError("data spec of kind 'hf' needs 'name' (a dataset name, a builder like 'json', or a local dir)")
    if "eval_fraction" in spec and not 0 < spec["eval_fraction"] < 1:
        raise ValueError(f"data spec 'eval_fraction' must be in (0, 1), got {spec['eval_fraction']!r}")
    return spec


def _require_tokenizer(tokenizer, kind: str) -> None:
    if tokenizer is None:
        raise ValueError(f"data of kind {kind!r} is text: pass the model's tokenizer (got None)")


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


def load_token_file(files: list[str], dtype: str = "uint16") -> np.ndarray:
    """A flat token array from .npy (memory-mapped), .pt (a 1-D tensor) or raw .bin files."""
    arrays = []
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
            arr = np.memmap(f, dtype=np.dtype(dtype), mode="r")
        else:
            raise ValueError(f"token file {f!r}: suffix must be one of .npy, .pt, .bin")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{f}: expected a flat integer token array, got shape {arr.shape} dtype {arr.dtype}")
        arrays.append(arr)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


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
    """Windows of a finite token array, in a seeded permutation per epoch (or in order)."""

    def __init__(self, tokens, *, context_length: int, batch_size: int, shuffle: bool, seed: int = 0, windows=None):
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.windows = np.arange(len(tokens) // context_length) if windows is None else np.asarray(windows)
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
        T = self.context_length
        rows = []
        for _ in range(self.batch_size):  # a batch may straddle two epochs
            n = len(self.windows)
            w = self._order_for(self.consumed // n)[self.consumed % n]
            rows.append(np.asarray(self.tokens[w * T : (w + 1) * T], dtype=np.int64))
            self.consumed += 1
        return torch.from_numpy(np.stack(rows))

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

    def __init__(self, spec: dict, tokenizer, *, context_length: int, batch_size: int, split: str, seed: int):
        self.spec = spec
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.column = spec.get("column", "text")
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
        name = str(spec["name"])
        streaming = spec.get("streaming", True)
        saved = Path(name)
        if (saved / "dataset_info.json").exists() or (saved / "dataset_dict.json").exists():
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
            if "input_ids" in columns:
                self._pretokenized = True
            elif self.column not in columns:
                raise ValueError(f"dataset {name!r} has no column {self.column!r} (data spec 'column'); columns: {columns}")
        if self.examples_consumed:
            ds = ds.skip(self.examples_consumed) if streaming else ds.select(range(self.examples_consumed, len(ds)))
        return iter(ds)

    def _tokens_of(self, example: dict) -> list[int]:
        if self._pretokenized is None:
            self._pretokenized = "input_ids" in example
            if not self._pretokenized and self.column not in example:
                raise ValueError(f"dataset has no column {self.column!r} (data spec 'column'); columns: {list(example)}")
        if self._pretokenized:
            return list(example["input_ids"])  # used as-is: packed, no EOS added
        _require_tokenizer(self.tokenizer, "hf (text column)")
        return self.tokenizer.encode(example[self.column], add_special_tokens=False) + [self.tokenizer.eos_token_id]

    def _next_window(self) -> list[int]:
        T = self.context_length
        while len(self.buffer) < T:
            if self._iterator is None:
                self._iterator = self._open()
            try:
                example = next(self._iterator)
            except StopIteration:
                if self.examples_consumed == 0:
                    raise ValueError(f"dataset {self.spec['name']!r} split {self.hf_split!r} is empty") from None
                self.epoch += 1
                self.examples_consumed = 0
                self._iterator = None
                continue
            self.buffer.extend(self._tokens_of(example))
            self.examples_consumed += 1
        window, self.buffer = self.buffer[:T], self.buffer[T:]
        return window

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
