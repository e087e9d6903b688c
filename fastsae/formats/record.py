"""SAERecord: an SAE as the formats read and write it, between the files and E2ESAE.

A reader returns a record (spec, tensors in fastsae's convention, metadata, the saved dtype);
E2ESAE.from_record builds the module from it, and E2ESAE.to_record gives writers the same. So
the formats need no module class, and E2ESAE's save / load are facades over them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastsae.spec import SAESpec, hook_in_out


@dataclass
class SAERecord:
    """spec: the SAE's SAESpec. tensors: W_enc [d_in, n_latents], b_enc [n_latents], W_dec
    [n_latents, d_out], b_dec [d_out], a skip-transcoder's W_skip [d_in, d_out] and the
    activation's extra tensors, in any float dtype and on
    any device (readers give float64 where they converted). metadata: JSON-serialisable facts
    (hook, model, ...). dtype: the dtype the SAE is stored in. source: where it came from."""

    spec: SAESpec
    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    source: str = ""


def expected_shapes(spec: SAESpec) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor an SAE of ``spec`` holds."""
    d, n, d_out = spec.d_in, spec.n_latents, spec.d_out
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
    if spec.skip:
        shapes["W_skip"] = (d, d_out)
    for name, extra in spec.kind.extra_tensors.items():
        shapes[name] = (n,) if extra.per_latent else ()
    return shapes


def make_record(where, tensors: dict, *, activation: str, params: dict, decoder_norm: str, metadata: dict,
                dtype: torch.dtype, spec: dict | None = None, d_out: int | None = None,
                skip: bool = False) -> SAERecord:
    """A checked record from converted tensors; d_in and n_latents come from W_enc (d_out and
    skip: a transcoder's, as the file says). ``spec``: a spec dict a file saved for fastsae
    (SAESpec.to_dict), which then decides every field."""
    if tensors["W_enc"].ndim != 2 or tensors["W_dec"].ndim != 2:
        raise ValueError(f"{where}: W_enc and W_dec must be matrices, got shapes {tuple(tensors['W_enc'].shape)} "
                         f"and {tuple(tensors['W_dec'].shape)}")
    d_in, n_latents = tensors["W_enc"].shape
    try:
        if spec is not None:
            record_spec = SAESpec.from_dict(spec, f"{where} (the fastsae entry)")
        else:
            record_spec = SAESpec.create(d_in, n_latents, activation, params=params, decoder_norm=decoder_norm,
                                         d_out=d_out, skip=skip)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    check_tensors(where, record_spec, tensors)
    return SAERecord(record_spec, tensors, metadata, dtype, str(where))


def record_hooks(record: SAERecord) -> tuple[str | None, str | None]:
    """(the hook it reads, the hook it writes) from metadata["hook"] ("IN->OUT" for a transcoder);
    (None, None) where the record names none."""
    hook = record.metadata.get("hook")
    return (None, None) if hook is None else hook_in_out(hook)


def is_transcoder(record: SAERecord) -> bool:
    """Whether the record is a transcoder: its spec says so (d_out != d_in, a skip path) or its
    hooks differ (a transcoder of equal widths has an SAE's spec)."""
    hook_in, hook_out = record_hooks(record)
    return record.spec.is_transcoder or hook_in != hook_out


def check_tensors(where, spec: SAESpec, tensors: dict) -> None:
    """Every tensor the spec implies is there with its shape, and nothing else."""
    shapes = expected_shapes(spec)
    missing = [name for name in shapes if name not in tensors]
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ValueError(f"{where} must hold exactly {list(shapes)}; missing {missing}, unexpected {extra}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                             f"(d_in={spec.d_in}, n_latents={spec.n_latents}, d_out={spec.d_out})")


def export_tensors(record: SAERecord) -> dict[str, torch.Tensor]:
    """The record's tensors in float64 on the CPU, W_dec with the rows its forward pass uses
    (decoder_norm "forward": unit rows; the code is unchanged, so thresholds are too)."""
    tensors = {name: t.detach().to("cpu", torch.float64) for name, t in record.tensors.items()}
    if record.spec.decoder_norm == "forward":
        tensors["W_dec"] = unit_rows(tensors["W_dec"])
    return tensors


def unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    return W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def require(tensors: dict, names, where) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{where} lacks the tensors {missing}; it holds {sorted(tensors)}")
