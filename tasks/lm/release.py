"""Validation, gates, registry, bundle and champion/challenger for generation models.

Reports are the shared `Report` rows (so the candidate table, plot and MLflow logging are the shared
stages'): quality holds perplexity, top-1 and KL vs FP32 on validation text and the test perplexity;
`latency_p50_ms`/`latency_p95_ms` are milliseconds per decoded token and `throughput_sps` decode tokens/s, at
the shortest prompt; time to first token per prompt length and peak memory sit beside them in `quality`.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import mlflow
import numpy as np
from prefect import task
from pydantic import Field

from tasks.compress.base import Candidate
from tasks.core import tracking
from tasks.core.settings import Section
from tasks.lm.evaluate import ONNX_FILE, LMEval, folder_size
from tasks.lm.export import kv_cache_bytes
from tasks.release.guard import BUNDLE_FORMAT, sha256_of
from tasks.release.promote import (
    Decision,
    PromoteConfig,
    _alias_version,
    act_on_decision,
    check_shipped_against_champion,
)
from tasks.release.register import RegisterConfig, RegisteredModel
from tasks.release.ship import staged, write_manifest
from tasks.release.stats import paired_bootstrap, ratio_interval
from tasks.release.validate import BASELINE, GateError, Report


class LMValidateConfig(Section):
    threads: int = Field(2, ge=1, description="ONNX Runtime intra-op threads for every measurement.")
    prompt_lengths: list[int] = Field(
        [32, 512],
        min_length=1,
        description="Prompt tokens at which time to first "
        "token and decode speed are measured (clipped to the context).",
    )
    new_tokens: int = Field(64, ge=4, description="Greedy tokens decoded per timing.")
    rounds: int = Field(2, ge=1, description="Timing rounds, candidates interleaved; the best round counts.")


class LMGateConfig(Section):
    max_ppl_increase_pct: float = Field(5.0, ge=0, description="Allowed validation-perplexity increase vs FP32, in %.")
    min_top1: float = Field(0.9, ge=0, le=1, description="Floor on top-1 next-token agreement with FP32.")
    max_kl: float = Field(0.1, ge=0, description="Ceiling on the mean KL divergence from FP32 (nats per token).")
    max_parity_error: float = Field(1e-3, gt=0, description="Max |ORT - PyTorch| FP32 logits on validation text.")
    min_decode_tok_s: float | None = Field(None, gt=0, description="Floor on decode tokens/s (shortest prompt).")
    max_ttft_ms: float | None = Field(None, gt=0, description="Ceiling on time to first token at the longest prompt.")
    max_peak_mb: float | None = Field(None, gt=0, description="Ceiling on peak memory generating at max_length.")
    max_size_mb: float | None = Field(None, gt=0, description="Ceiling on the model's size on disk.")
    select_by: Literal["latency_p50_ms", "size_bytes", "quality"] = Field(
        "latency_p50_ms",
        description="Among passing candidates: fastest decode (latency_p50_ms = ms per token), "
        "smallest, or best top-1 agreement.",
    )
    latency_tie: float = Field(
        1.05,
        ge=1,
        description="select_by latency: a candidate counts as slower than the fastest only when the 95% "
        "interval of its ms-per-token ratio over the interleaved timing rounds lies above this; the tied ones "
        "are ranked by top-1 agreement, then size (so timing noise never decides).",
    )


class LMRegisterConfig(RegisterConfig):
    model_name: str = Field("causal-lm", min_length=1, description="MLflow registered-model name.")
    bundle_dir: Path = Field(Path("deploy/lm-bundle"), description="Serving bundle folder (replaced atomically).")


class LMPromoteConfig(PromoteConfig):
    quality_tolerance: float = Field(
        1.0,
        ge=0,
        description="Test perplexity within this many percent of the "
        "champion's counts as a match; the challenger then needs faster decode.",
    )
    champion_bundle_dir: Path = Field(
        Path("deploy/lm-champion"), description="Champion bundle; replaced atomically on promotion."
    )


MODEL_DIR = "model"


def validate_lm(candidates: list[Candidate], evaluator: LMEval, cfg: LMValidateConfig, max_length: int) -> list[Report]:
    timings = evaluator.timings(
        {c.name: c.checkpoint for c in candidates}, cfg.prompt_lengths, cfg.new_tokens, max_length, cfg.rounds
    )
    reports = []
    for c in candidates:
        quality = evaluator.quality(c.checkpoint)
        t = timings[c.name]
        shortest = t["prompts"][min(t["prompts"], key=int)]
        quality |= {f"ttft_{n}_ms": p["ttft_ms"] for n, p in t["prompts"].items()}
        quality |= {f"decode_{n}_tok_s": p["decode_tok_s"] for n, p in t["prompts"].items()}
        quality |= {"peak_mb": t["peak_mb"], "kv_cache_mb": kv_cache_bytes(c.checkpoint) / 2**20}
        print(f"[validate] {c.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in quality.items()))
        reports.append(
            Report(
                c.name,
                str(c.onnx),
                quality,
                evaluator.primary,
                shortest["step_p50_ms"],
                shortest["step_p95_ms"],
                shortest["decode_tok_s"],
                folder_size(c.checkpoint),
                c.parity_max_abs,
                latency_rounds_ms=tuple(1000 / tok_s for tok_s in t["rounds_tok_s"]),
            )
        )
    return reports


def lm_gate_failures(r: Report, base: Report, gates: LMGateConfig) -> list[str]:
    q, failed = r.quality, []
    increase = (q["perplexity"] / base.quality["perplexity"] - 1) * 100
    if increase > gates.max_ppl_increase_pct:
        failed.append(f"perplexity +{increase:.2f}% > {gates.max_ppl_increase_pct:.2f}%")
    if q["top1"] < gates.min_top1:
        failed.append(f"top-1 agreement {q['top1']:.4f} < min {gates.min_top1:.4f}")
    if q["kl"] > gates.max_kl:
        failed.append(f"KL {q['kl']:.4f} > max {gates.max_kl:.4f}")
    if r.parity_max_abs is not None and not r.parity_max_abs <= gates.max_parity_error:
        failed.append(f"parity {r.parity_max_abs:.2e} > {gates.max_parity_error:.0e}")
    if gates.min_decode_tok_s is not None and r.throughput_sps < gates.min_decode_tok_s:
        failed.append(f"decode {r.throughput_sps:.1f} tok/s < min {gates.min_decode_tok_s}")
    ttft = max((v for k, v in q.items() if k.startswith("ttft_")), default=0.0)
    if gates.max_ttft_ms is not None and ttft > gates.max_ttft_ms:
        failed.append(f"time to first token {ttft:.1f} ms > max {gates.max_ttft_ms}")
    if gates.max_peak_mb is not None and q["peak_mb"] > gates.max_peak_mb:
        failed.append(f"peak memory {q['peak_mb']:.0f} MB > max {gates.max_peak_mb}")
    if gates.max_size_mb is not None and r.size_bytes / 2**20 > gates.max_size_mb:
        failed.append(f"size {r.size_bytes / 2**20:.1f} MB > max {gates.max_size_mb}")
    return failed


def apply_lm_gates(reports: list[Report], gates: LMGateConfig) -> list[Report]:
    base = next((r for r in reports if r.name == BASELINE), None)
    if base is None:
        raise GateError("gates need the FP32 baseline candidate as reference, and it is missing")
    return [
        replace(
            r,
            quality=r.quality | {"ppl_increase_pct": (r.quality["perplexity"] / base.quality["perplexity"] - 1) * 100},
            failed_gates=lm_gate_failures(r, base, gates),
        )
        for r in reports
    ]


def register_lm(model_dir: Path, cfg: LMRegisterConfig, run_id: str, metrics: dict) -> RegisteredModel:
    """The model folder (ONNX, genai config, tokenizer, chat template, generation config) logged to the run as
    artifact `model` and registered as a new version carrying the metrics as tags."""
    client = tracking.client()
    client.log_artifacts(run_id, str(model_dir), MODEL_DIR)
    if not client.search_registered_models(f"name = '{cfg.model_name}'"):
        client.create_registered_model(cfg.model_name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"
    version = str(
        client.create_model_version(
            cfg.model_name, source, run_id, tags={k: f"{v:.6g}" for k, v in metrics.items() if isinstance(v, float)}
        ).version
    )
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    print(f"[register] {cfg.model_name} version {version} -> alias '{cfg.alias}'")
    return RegisteredModel(cfg.model_name, version, cfg.alias, f"models:/{cfg.model_name}@{cfg.alias}")


def ship_lm(model_dir: Path, bundle_dir: Path, max_length: int, data_version: str, details: dict) -> Path:
    """The contract's LM bundle: `model/` (the whole generation folder) and a manifest hashing every file in it,
    assembled beside the target and swapped in atomically."""
    bundle_dir = Path(bundle_dir)
    with staged(bundle_dir) as tmp:
        shutil.copytree(model_dir, tmp / MODEL_DIR)
        files = {str(p.relative_to(tmp)): sha256_of(p) for p in sorted((tmp / MODEL_DIR).rglob("*")) if p.is_file()}
        manifest = {
            "format": BUNDLE_FORMAT,
            "family": "causal_lm",
            "model_dir": MODEL_DIR,
            "files": files,
            # the ONNX decoder's hash under the key every bundle has (rollback prints it)
            "model_file": f"{MODEL_DIR}/{ONNX_FILE}",
            "sha256": files[f"{MODEL_DIR}/{ONNX_FILE}"],
            "size_bytes": folder_size(tmp / MODEL_DIR),
            "max_length": max_length,
            "data_version": data_version,
            "created_at": datetime.now(UTC).isoformat(),
            **details,
        }
        write_manifest(tmp, manifest)
    print(f"[ship] LM bundle {bundle_dir} ({len(files)} files hashed)")
    return bundle_dir


def paired_perplexity(challenger: dict, champion: dict) -> dict:
    """How much lower the challenger's test perplexity is than the champion's, in percent, with a 95%
    paired bootstrap interval over the same test windows (the decision rule of every pipeline takes it)."""
    gain, low, high = paired_bootstrap(np.array(champion["window_nll"]), np.array(challenger["window_nll"]), np.mean)
    pct = lambda nll: (np.exp(nll) - 1) * 100  # a mean NLL lower by d is a perplexity lower by e^d - 1
    return {
        "metric": "test perplexity (%)",
        "challenger": challenger["perplexity"],
        "champion": champion["perplexity"],
        "gain_pts": float(pct(gain)),
        "interval_pts": [float(pct(low)), float(pct(high))],
        "test": "paired bootstrap over test windows",
    }


def promote_lm(
    registered: RegisteredModel,
    bundle_dir: Path,
    cfg: LMPromoteConfig,
    timing: LMValidateConfig,
    evaluator: LMEval,
    max_length: int,
    run_id: str,
) -> Decision:
    """Challenger vs champion on the same test text, decode timed side by side; refused (nothing replaced) when
    the champion folder or the registered champion serves another model or task, as checked at the start."""
    check_shipped_against_champion(registered.name, bundle_dir, cfg)
    champion_version = _alias_version(registered.name, cfg.champion_alias)
    client = tracking.client()
    quality = speed = None
    if champion_version is None or champion_version == registered.version:
        scores = {"challenger": {"test_perplexity": evaluator.test_perplexity(Path(bundle_dir) / MODEL_DIR)}}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            source = client.get_model_version(registered.name, champion_version).source
            folders = {
                "challenger": Path(bundle_dir) / MODEL_DIR,
                "champion": Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)),
            }
            speeds = evaluator.timings(folders, timing.prompt_lengths[:1], timing.new_tokens, max_length, timing.rounds)
            tests = {k: evaluator.test_score(f) for k, f in folders.items()}
        scores = {
            k: {
                "test_perplexity": tests[k]["perplexity"],
                "decode_tok_s": next(iter(speeds[k]["prompts"].values()))["decode_tok_s"],
            }
            for k in folders
        }
        quality = paired_perplexity(tests["challenger"], tests["champion"])
        # tokens/s, so challenger over champion is the speed-up; one ratio per interleaved round
        ratio, low, high = ratio_interval(speeds["challenger"]["rounds_tok_s"], speeds["champion"]["rounds_tok_s"])
        speed = {"speedup": ratio, "interval": [low, high]}
    return act_on_decision(
        registered, Path(bundle_dir), cfg, champion_version, scores, quality, speed, "test perplexity", run_id
    )


validate_lm_task = task(name="validate_lm")(validate_lm)
register_lm_task = task(name="register_lm")(register_lm)
ship_lm_task = task(name="ship_lm")(ship_lm)
promote_lm_task = task(name="promote_lm")(promote_lm)
