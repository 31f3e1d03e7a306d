"""Shared test helpers: exact fp64 oracles, relative error, loading a script as a module, running
scripts' command lines in their own processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_CASES = r"""
import contextlib, io, json, runpy, sys, traceback
script, cases, results = sys.argv[1], json.loads(sys.argv[2]), []
for argv in cases:
    sys.argv, err, status = [script, *argv], io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        except Exception:
            traceback.print_exc()
            status = 1
    results.append([status, err.getvalue()])
print("\n@@cases@@" + json.dumps(results))
"""


def script_env(**overrides: str) -> dict:
    """The environment scripts' tests run them in: the CPU, every op on its PyTorch reference
    (``TRITON_INTERPRET=0``, as ``make demo`` runs them; the kernels have their own tests), then
    ``overrides``."""
    return {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", **overrides}


def run_script(script: str, *argv: str, env: dict | None = None) -> str:
    """Run ``script`` (a path under the repository) in its own process (``env``: overrides of
    :func:`script_env`); its stdout (it must succeed)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / script), *argv],
        cwd=ROOT,
        env=script_env(**(env or {})),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_script_cases(script: str, cases: list[list[str]]) -> list[tuple[int, str]]:
    """Run ``script``'s command line once per argv of ``cases``, all in one fresh process (one import
    of torch and diffusers, not one each), each as ``python script ARGV`` runs it (``__main__``):
    ``[(exit status, stderr)]``, status 1 and the traceback where it raised."""
    done = subprocess.run(
        [sys.executable, "-c", _CASES, str(ROOT / script), json.dumps(cases)],
        cwd=ROOT,
        env=script_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "@@cases@@" in done.stdout, done.stderr[-3000:]
    return [tuple(result) for result in json.loads(done.stdout.rsplit("@@cases@@", 1)[1])]


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
