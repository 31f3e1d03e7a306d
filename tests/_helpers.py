"""Shared test helpers: exact fp64 oracles, relative error, loading a script as a module."""

import importlib.util
from pathlib import Path

import torch


def load_script(path: Path, name: str | None = None):
    """The script at ``path`` (a demo or benchmark, not a package module) imported as a module."""
    spec = importlib.util.spec_from_file_location(name or Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def masked_attention_fp64(q, k, v, scale=None, bias=None, mask=None):
    """Explicit dense attention in fp64 with an additive key bias [B|1,H|1,Sk] and a token mask
    [B|1,H|1,Sq,Sk] -> (out [B,Sq,H,D], lse [B,H,Sq]); rows with no visible key give 0 / -inf."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()[:, :, None, :]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    ok = torch.isfinite(lse)
    p = torch.where(ok[..., None], torch.exp(s - torch.where(ok, lse, 0.0)[..., None]), 0.0)
    return (p @ v).transpose(1, 2), torch.where(ok, lse, float("-inf"))
