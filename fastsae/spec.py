"""SAESpec: what defines an SAE's function and how it starts, in one checked, serialisable record.

    spec = SAESpec.create(768, 46_080, "topk", k=32)
    spec.to_dict()  ->  {"d_in": 768, "n_latents": 46080, "activation": "topk", "params": {"k": 32}, ...}

A transcoder (an SAE that reads one activation and writes another, e.g. an MLP's input and its
output) is the same record with ``d_out`` (the width it writes; default d_in) and ``skip`` (an
affine skip path W_skip [d_in, d_out] added to the reconstruction, as skip-transcoders have).

E2ESAE, the training config, every file format, the sharded SAE and the planner read this one
record; every field round-trips through save and load. The activation's hyperparameters are its
registry module's Params dataclass (fastsae.activations), checked once, here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastsae.activations import ACTIVATIONS, Activation, get_activation

DECODER_NORMS = ("forward", "project")
INITS = ("paper", "topk", "orthogonal")


def activations_with(field_name: str) -> tuple[str, ...]:
    """The activations whose hyperparameters include `field_name` (e.g. "k": topk, batchtopk)."""
    return tuple(name for name, kind in sorted(ACTIVATIONS.items())
                 if field_name in {f.name for f in dataclasses.fields(kind.Params)})


@dataclass(frozen=True)
class SAESpec:
    """An SAE's shape, activation (+ hyperparameters), decoder normalisation and init; d_out and
    skip for a transcoder (d_out == d_in and no skip for an SAE).

    Build it with SAESpec.create (which checks every field); ``params`` is the activation's
    Params dataclass instance.
    """

    d_in: int
    n_latents: int
    activation: str
    params: object
    decoder_norm: str = "forward"
    init: str = "paper"
    init_encoder_as_decoder_transpose: bool = False
    d_out: int | None = None  # the width it writes (create() sets it: d_in unless given)
    skip: bool = False  # an affine skip path W_skip [d_in, d_out] (skip-transcoders)

    @classmethod
    def create(cls, d_in: int, n_latents: int, activation: str = "relu", *, k=None, params: dict | None = None,
               decoder_norm: str = "forward", init: str | None = None,
               init_encoder_as_decoder_transpose: bool = False, d_out: int | None = None,
               skip: bool = False) -> "SAESpec":
        """A checked spec; a bad field raises ValueError naming it and what was expected.

        k: shorthand for params["k"] (the activations with k: topk, batchtopk). init None: the
        activation's default ("paper" for ReLU and JumpReLU, "topk" for TopK and BatchTopK).
        d_out None: d_in (an SAE); skip: a transcoder's affine skip path.
        """
        d_out = d_in if d_out is None else d_out
        for name, value in (("d_in", d_in), ("n_latents", n_latents), ("d_out", d_out)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kind = get_activation(activation)
        values = check_params(kind, k, params, n_latents)
        if decoder_norm not in DECODER_NORMS:
            raise ValueError(f"decoder_norm must be one of {DECODER_NORMS}, got {decoder_norm!r}")
        init = kind.default_init if init is None else init
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} (or None for the activation's default), got {init!r}")
        if not isinstance(init_encoder_as_decoder_transpose, bool):
            raise ValueError(f"init_encoder_as_decoder_transpose must be a bool, got "
                             f"{init_encoder_as_decoder_transpose!r}")
        if init_encoder_as_decoder_transpose and d_out != d_in:
            raise ValueError(f"init_encoder_as_decoder_transpose needs d_out == d_in (the encoder is the decoder's "
                             f"transpose), got d_in={d_in}, d_out={d_out}")
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be a bool, got {skip!r}")
        return cls(d_in, n_latents, activation, values, decoder_norm, init, init_encoder_as_decoder_transpose,
                   d_out, skip)

    @property
    def is_transcoder(self) -> bool:
        """Whether it writes another width than it reads, or has a skip path. (A transcoder with
        d_out == d_in and no skip has an SAE's spec: its hooks, in the metadata, say what it is.)"""
        return self.d_out != self.d_in or self.skip

    @property
    def kind(self) -> type[Activation]:
        return get_activation(self.activation)

    @property
    def k(self):
        """The activation's k (topk, batchtopk), else None."""
        return getattr(self.params, "k", None)

    def hyperparameters(self) -> dict:
        return dataclasses.asdict(self.params)

    def to_dict(self) -> dict:
        return {"d_in": self.d_in, "n_latents": self.n_latents, "activation": self.activation,
                "params": self.hyperparameters(), "decoder_norm": self.decoder_norm, "init": self.init,
                "init_encoder_as_decoder_transpose": self.init_encoder_as_decoder_transpose,
                "d_out": self.d_out, "skip": self.skip}

    @classmethod
    def from_dict(cls, data: dict, where: str = "spec") -> "SAESpec":
        """The spec to_dict() wrote; a missing or bad entry is a ValueError naming ``where``."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{where}: unknown SAE spec entries {unknown}")
        try:
            return cls.create(data["d_in"], data["n_latents"], data.get("activation", "relu"),
                              params=data.get("params"), decoder_norm=data.get("decoder_norm", "forward"),
                              init=data.get("init"),
                              init_encoder_as_decoder_transpose=data.get("init_encoder_as_decoder_transpose", False),
                              d_out=data.get("d_out"), skip=data.get("skip", False))
        except KeyError as error:
            raise ValueError(f"{where} lacks the entry {error.args[0]!r}") from None
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def with_latents(self, n_latents: int) -> "SAESpec":
        """The same SAE with another dictionary size (checked again: k must still fit)."""
        return SAESpec.create(self.d_in, n_latents, self.activation, params=self.hyperparameters(),
                              decoder_norm=self.decoder_norm, init=self.init,
                              init_encoder_as_decoder_transpose=self.init_encoder_as_decoder_transpose,
                              d_out=self.d_out, skip=self.skip)


def check_params(kind: type[Activation], k, params: dict | None, n_latents: int | None):
    """The activation's Params from the shorthand k and a {name: value} dict, checked (n_latents
    None: where the dictionary size is not known yet, as while a config is read)."""
    values = dict(params or {})
    if k is not None:
        with_k = activations_with("k")
        if kind.name not in with_k:
            raise ValueError(f"k is only for the activations {list(with_k)}; got k={k!r} with "
                             f"activation={kind.name!r}")
        if "k" in values and values["k"] != k:
            raise ValueError(f"k is given twice with different values: k={k!r} and params k={values['k']!r}")
        values["k"] = k
    try:
        return kind.make_params(values, n_latents)
    except TypeError as error:  # a hyperparameter of the wrong type: a bad value like any other
        raise ValueError(str(error)) from None


# A transcoder reads one hook and writes another; fastsae names it by both, "IN->OUT" (config
# saes.hooks, run directories, metrics, files' metadata), so one string still keys each dictionary.
TRANSCODER_ARROW = "->"


def hook_in_out(hook: str) -> tuple[str, str]:
    """(the hook it reads, the hook it writes): both ``hook`` for an SAE; "IN->OUT" for a transcoder
    (e.g. "blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out")."""
    if not isinstance(hook, str):
        raise ValueError(f"a hook name must be a string, got {type(hook).__name__}: {hook!r}")
    if TRANSCODER_ARROW not in hook:
        return hook, hook
    parts = [part.strip() for part in hook.split(TRANSCODER_ARROW)]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise ValueError(f"a transcoder's hook is 'IN{TRANSCODER_ARROW}OUT' with two different hook names "
                         f"(e.g. 'blocks.1.ln2.hook_normalized{TRANSCODER_ARROW}blocks.1.hook_mlp_out'), got {hook!r}")
    return parts[0], parts[1]


def transcoder_hook(hook_in: str, hook_out: str | None) -> str:
    """The name of a coder reading hook_in and writing hook_out: hook_in itself where they are one."""
    return hook_in if hook_out is None or hook_out == hook_in else f"{hook_in}{TRANSCODER_ARROW}{hook_out}"
