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


def save_tiny_gpt2(path: Path, *, n_layer: int = 3, n_embd: int = 32, n_head: int = 4, n_ctx: int = 64, seed: int = 0,
                   tokenizer=None) -> Path:
    """A random-weight GPT2LMHeadModel + tokenizer (default: train_tiny_tokenizer()) saved in `path`;
    returns path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tokenizer or train_tiny_tokenizer()
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


# ---------------------------------------------------------------- the model families of issue 9

# family -> (transformers config class, model class, family-specific config fields). Sizes come from
# save_tiny_model; head_dim is set where a family's default is not d_model / n_heads (Gemma: 256).
MODEL_FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "pythia": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"use_parallel_residual": True}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"kv_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"kv_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"kv_heads": 2}),
    # Gemma-2/3: a sliding and a global layer, and final-logit soft-capping at 5 (Gemma-2 ships 30;
    # with the tiny model's logits of a few units, 5 makes the cap's tanh clearly non-linear).
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "kv_heads": 2, "head_dim": True, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 50.0,
        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "kv_heads": 2, "head_dim": True, "final_logit_softcapping": 5.0,
        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"kv_heads": 2}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def tiny_model_config(family: str, vocab_size: int, special_id: int, *, n_layers: int = 2, d_model: int = 64,
                      n_heads: int = 4, d_mlp: int = 128, n_ctx: int = 64):
    """The transformers config of a tiny `family` model (see MODEL_FAMILIES). Raises AttributeError
    when the installed transformers lacks the family."""
    import transformers

    config_name, _, extra = MODEL_FAMILIES[family]
    config_class = getattr(transformers, config_name)
    extra = dict(extra)
    special = {"bos_token_id": special_id, "eos_token_id": special_id, "pad_token_id": special_id}
    if family == "gpt2":
        # n_ctx is set explicitly: TransformerLens 3.x reads config.n_ctx for GPT-2 models. The MLP is
        # GPT-2's 4 x d_model (n_inner unset, as in every GPT-2 checkpoint): TL 3.x's HookedTransformer
        # ignores n_inner, so d_mlp is not used here.
        return config_class(vocab_size=vocab_size, n_positions=n_ctx, n_ctx=n_ctx, n_embd=d_model, n_layer=n_layers,
                            n_head=n_heads, **special)
    kv_heads = extra.pop("kv_heads", n_heads)
    if extra.pop("head_dim", False):
        extra["head_dim"] = d_model // n_heads
        extra["query_pre_attn_scalar"] = d_model // n_heads
    fields = dict(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  intermediate_size=d_mlp, max_position_embeddings=n_ctx, **special, **extra)
    if family != "pythia":
        fields["num_key_value_heads"] = kv_heads
    if family == "phi3":
        fields["original_max_position_embeddings"] = n_ctx
    return config_class(**fields)


def save_tiny_model(path: Path, family: str, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
                    d_mlp: int = 128, n_ctx: int = 64, seed: int = 0) -> Path:
    """A random-weight model of `family` (a key of MODEL_FAMILIES) + the tiny tokenizer saved in
    `path`; returns path. Raises AttributeError when the installed transformers lacks the family.

    Layer-norm weights and biases get noise (a wrong final norm or a missing bias shows), and the
    unembedding is scaled so the logits are a few units: the output distribution is far from
    uniform, so KL and CE (and a final-logit soft-cap) are not trivially small.
    """
    import torch
    import transformers

    tokenizer = train_tiny_tokenizer()
    config = tiny_model_config(family, len(tokenizer), tokenizer.eos_token_id, n_layers=n_layers, d_model=d_model,
                               n_heads=n_heads, d_mlp=d_mlp, n_ctx=n_ctx)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_FAMILIES[family][1])(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.get_output_embeddings().weight.mul_(10.0)  # tied models: the input embedding too
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
