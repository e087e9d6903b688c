"""Tiny models for tests: random GPT-2 weights and a byte-level BPE tokenizer trained in-process,
saved with save_pretrained so they load through the same directory path as real models, offline."""

from pathlib import Path

TINY_TEXT = (
    "the quick brown fox jumps over the lazy dog. a sparse autoencoder reads the residual stream "
    "and writes it back. end to end training matches the output distribution of the model. "
)


def train_tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def save_tiny_gpt2(path: Path, *, n_layer: int = 3, n_embd: int = 32, n_head: int = 4, n_ctx: int = 64, seed: int = 0) -> Path:
    """A random-weight GPT2LMHeadModel + tokenizer saved in `path`; returns path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(seed)
    # n_ctx is set explicitly: TransformerLens 3.x reads config.n_ctx for GPT-2 models.
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_ctx,
        n_ctx=n_ctx,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    # Non-trivial layer-norm and bias values, so a wrong final layer norm or a missing bias shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_batches(n: int, batch: int, ctx: int, *, seed: int = 0, vocab: int = 250) -> list:
    """n token batches [batch, ctx] of uniform random ids below vocab (the tiny tokenizer has 300)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, ctx), generator=g) for _ in range(n)]

