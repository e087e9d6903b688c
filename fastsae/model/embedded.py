"""The embedded default model: a small real GPT-2-shaped language model that needs no download.

On first use fastsae trains a byte-level BPE tokenizer and a small GPT2LMHeadModel on English text
that ships with Python itself (pydoc_data's help topics: the language reference, ~465 KB), then
caches both under $FASTSAE_CACHE (default ~/.cache/fastsae)/embedded-<version>-<hash>/. The hash
covers the training config and the corpus, so another Python version (another corpus) or a test
config never picks up the wrong cache. The directory is built under a temporary name and renamed
into place only when complete: a crash leaves no directory that would be loaded.

Everything is seeded: the corpus split, the tokenizer, the weights' init and the batch order.
Pretraining runs on one CPU thread (the caller's setting is restored afterwards): its matrices are
small (d_model 128), and on a busy machine OpenMP threads wait for each other: on the project's
2-core machine shared with other jobs a step took 1.9 s on one thread and 5.5 s on two, and the
whole build 1,001 s and 2,340 s (idle: 165 s and 102 s, so one thread costs a minute there and
saves twenty when the machine is busy). One thread also keeps the model from depending on the machine's
core count (thread counts change the float rounding).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fastsae._files import honour_umask
from fastsae.model.sources import quiet_transformers_progress

# What the first build of the default config takes, shown before it starts (the bar then shows the
# real rate). Measured on the project's CPU machine (2-core Intel Xeon) with `fastsae train embedded`
# into an empty cache against a warm one, idle and with one other busy process (README, "Measured":
# benchmarks/results/main_job_*.json); earlier on a 2-core AMD EPYC: 3 min idle, 17 min shared.
PRETRAIN_TIME_NOTE = "about 75 s on an idle 2-core Intel Xeon, the same beside one other busy process"

EMBEDDED_VERSION = "1"
EOS = "<|endoftext|>"
_DONE_FILE = "fastsae_embedded.json"  # written last inside the temp dir; metadata + losses


@dataclass(frozen=True)
class EmbeddedConfig:
    vocab_size: int = 2048
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_ctx: int = 128
    steps: int = 250  # of batch_size * n_ctx tokens each; how long: PRETRAIN_TIME_NOTE
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 10  # every 10th paragraph of the corpus goes to the eval split
    max_corpus_chars: int = 0  # 0: the whole corpus; tests use a slice to stay fast


DEFAULT_CONFIG = EmbeddedConfig()


# ---------------------------------------------------------------- corpus


@lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    """The corpus as paragraphs, in a fixed order."""
    try:
        from pydoc_data.topics import topics

        texts = [topics[k] for k in sorted(topics)]
    except ImportError:  # some distributions strip pydoc_data: fall back to the stdlib's docstrings
        texts = _stdlib_docstrings()
    paragraphs = []
    for text in texts:
        for para in text.split("\n\n"):
            para = para.strip("\n")
            if para.strip():
                paragraphs.append(para)
    return tuple(paragraphs)


def _stdlib_docstrings() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    return docs


def embedded_corpus(split: str = "train", *, eval_every: int = DEFAULT_CONFIG.eval_every) -> str:
    """The embedded corpus: every `eval_every`-th paragraph is held out as "eval", the rest is
    "train". Paragraphs are joined with blank lines. Deterministic for a given Python install."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    held_out = split == "eval"
    chosen = [p for i, p in enumerate(_paragraphs()) if (i % eval_every == eval_every - 1) == held_out]
    return "\n\n".join(chosen)


def _corpus_hash() -> str:
    return hashlib.sha256("\x00".join(_paragraphs()).encode()).hexdigest()[:10]


# ---------------------------------------------------------------- cache


def default_cache_root() -> Path:
    return Path(os.environ.get("FASTSAE_CACHE") or Path.home() / ".cache" / "fastsae")


def embedded_model_dir(cache_dir: str | Path | None = None, config: EmbeddedConfig = DEFAULT_CONFIG) -> Path:
    """Where the embedded model for `config` lives (whether or not it is built yet)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    key = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:6]
    return root / f"embedded-{EMBEDDED_VERSION}-{_corpus_hash()}-{key}"


def ensure_embedded_model(
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    config: EmbeddedConfig | None = None,
) -> Path:
    """The directory holding the embedded HF model + tokenizer; builds it on first use.

    cache_dir: the cache root (default $FASTSAE_CACHE or ~/.cache/fastsae). force: rebuild even
    if cached. config: override the model/training config (tests use a tiny one).
    """
    config = config or DEFAULT_CONFIG
    target = embedded_model_dir(cache_dir, config)
    if not force and (target / _DONE_FILE).is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target (same filesystem, so the rename is atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        honour_umask(tmp, directory=True)  # mkdtemp makes 0700; the cache is renamed into place
        if progress:
            expected = f"; {PRETRAIN_TIME_NOTE}" if config == DEFAULT_CONFIG else ""
            print(
                f"fastsae: pretraining the embedded model once (a {config.n_layer}-layer GPT-2, "
                f"{config.steps} steps of {config.batch_size * config.n_ctx:,} tokens{expected}) into {target}",
                file=sys.stderr,
                flush=True,
            )
        start = time.perf_counter()
        stats = _build(tmp, config, progress=progress)
        stats["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / _DONE_FILE).write_text(json.dumps({"config": asdict(config), **stats}, indent=2))
        _move_into_place(tmp, target, replace_existing=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(
            f"fastsae: embedded model ready in {stats['seconds']:.0f} s: eval loss "
            f"{stats['eval_loss_after']:.2f} nats/token (unigram {stats['unigram_eval_loss']:.2f}, "
            f"untrained {stats['eval_loss_before']:.2f})",
            file=sys.stderr,
            flush=True,
        )
    return target


def _move_into_place(tmp: Path, target: Path, *, replace_existing: bool) -> None:
    if replace_existing and target.exists():
        # Rename the old one away first, so readers see either the old or the new directory.
        old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
        os.replace(target, old / "model")
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished first (the target is a non-empty directory): keep theirs.
        if (target / _DONE_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


# ---------------------------------------------------------------- building


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on `text`, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def _encode(tokenizer, text: str) -> torch.Tensor:
    """Paragraph token ids joined by EOS, as one flat LongTensor."""
    ids: list[int] = []
    # one batched call: the same ids as encoding each paragraph alone, without a Python call per paragraph
    for para in tokenizer(text.split("\n\n"), add_special_tokens=False)["input_ids"]:
        ids.extend(para)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _windows(ids: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """Non-overlapping windows of n_ctx + 1 tokens (inputs and next-token targets)."""
    n = (len(ids) - 1) // n_ctx
    return torch.stack([ids[i * n_ctx : i * n_ctx + n_ctx + 1] for i in range(n)])


@torch.no_grad()
def _mean_loss(model, windows: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        logits = model(w[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return total / count


def _unigram_loss(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy of the eval tokens under add-one-smoothed train unigram frequencies."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return -logp[eval_ids].mean().item()


def _build(out: Path, config: EmbeddedConfig, *, progress: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring; the caller's setting is restored
    try:
        return _pretrain(out, config, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(out: Path, config: EmbeddedConfig, progress: bool) -> dict:
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    train_text = embedded_corpus("train", eval_every=config.eval_every)
    eval_text = embedded_corpus("eval", eval_every=config.eval_every)
    if config.max_corpus_chars:
        train_text = train_text[: config.max_corpus_chars]
        eval_text = eval_text[: max(config.max_corpus_chars // config.eval_every, 4 * config.n_ctx)]
    tokenizer = train_tokenizer(train_text, config.vocab_size)
    train_ids, eval_ids = _encode(tokenizer, train_text), _encode(tokenizer, eval_text)
    vocab_size = len(tokenizer)

    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.n_ctx,
        n_ctx=config.n_ctx,  # TransformerLens 3.x reads n_ctx for GPT-2 models
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # No dropout: tiny model, short training, and the SAE trainer runs it in eval mode anyway.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(model_config)
    eval_windows = _windows(eval_ids, config.n_ctx)
    # Eval on at most 64 windows (8k tokens) for the train loss, all of them for eval.
    train_probe = _windows(train_ids, config.n_ctx)[:64]
    stats = {
        "train_tokens": len(train_ids),
        "eval_tokens": len(eval_ids),
        "unigram_eval_loss": _unigram_loss(train_ids, eval_ids, vocab_size),
        "train_loss_before": _mean_loss(model, train_probe),
        "eval_loss_before": _mean_loss(model, eval_windows),
    }

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    tokens_per_step = config.batch_size * config.n_ctx
    bar = tqdm(total=config.steps, unit="step", desc="pretraining", disable=not progress, dynamic_ncols=True)
    model.train()
    for step in range(config.steps):
        # Warmup, then cosine to 10 % of the peak learning rate.
        if step < config.warmup_steps:
            lr = config.lr * (step + 1) / config.warmup_steps
        else:
            frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            lr = config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - config.n_ctx - 1, (config.batch_size,), generator=generator)
        batch = torch.stack([train_ids[s : s + config.n_ctx + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.update()
        if progress and (step % 10 == 0 or step == config.steps - 1):
            elapsed = bar.format_dict["elapsed"]
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{bar.n * tokens_per_step / max(elapsed, 1e-9):,.0f}")
    bar.close()

    stats["train_loss_after"] = _mean_loss(model, train_probe)
    stats["eval_loss_after"] = _mean_loss(model, eval_windows)
    with quiet_transformers_progress():  # no "Writing model shards" bar for one small file
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return stats


def embedded_stats(cache_dir: str | Path | None = None, config: EmbeddedConfig = DEFAULT_CONFIG) -> dict:
    """The metadata saved with a built embedded model: config, losses before/after, seconds."""
    return json.loads((embedded_model_dir(cache_dir, config) / _DONE_FILE).read_text())


__all__ = [
    "EMBEDDED_VERSION",
    "EmbeddedConfig",
    "DEFAULT_CONFIG",
    "embedded_corpus",
    "embedded_model_dir",
    "embedded_stats",
    "ensure_embedded_model",
    "quiet_transformers_progress",
    "train_tokenizer",
]
