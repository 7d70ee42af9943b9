"""The sentence-encoder pipeline: corpus -> pretrained MiniLM -> ONNX -> optimise / quantise / distil
-> validate -> register -> ship -> promote.

Wiring only; each stage lives in `tasks/`. Validation, gates, registry, bundle and promotion are the
classifier pipeline's own stages, with an evaluator that measures embedding fidelity.
"""

from __future__ import annotations

from prefect import flow

from flows.release import validate_and_release
from tasks.config import EncoderPipelineConfig
from tasks.core import tracking
from tasks.data.version import version_data_task
from tasks.encoder.compress import compress_encoder_task, export_teacher_task
from tasks.pipeline_run import already_done, pipeline_run
from tasks.release.evaluate import EncoderEval
from tasks.release.promote import check_champion_task


@flow(name="optimize-encoder", log_prints=True)
def optimize_encoder(
    config_path: str = "configs/minilm.yaml",
    root: str = ".",
    force: bool = False,
    lock_wait_s: float = 0,
    overrides: list[str] | None = None,
) -> dict:
    with pipeline_run(
        config_path,
        root,
        "optimize-encoder",
        family="minilm",
        lock_wait_s=lock_wait_s,
        overrides=tuple(overrides or ()),
    ) as run:
        cfg, work = run.cfg, run.cfg.workdir / "encoder"
        assert isinstance(cfg, EncoderPipelineConfig)  # pipeline_run checked the family

        data = version_data_task(cfg.data, run.root)
        tracking.log_dataset(run.run_id, data.dir, data.md5)
        if skipped := already_done(run, data.md5, force):
            return skipped
        check_champion_task(cfg.register_.model_name, data.dir, cfg.promote)

        out = work / "candidates" / run.run_id
        teacher, tokenizer_dir = export_teacher_task(cfg.encoder, data.dir, out)
        candidates = [teacher] + [
            compress_encoder_task(name, recipe, teacher, cfg.encoder, data.dir, data.md5, out, work / "students")
            for name, recipe in cfg.compress.candidates.items()
        ]

        evaluator = EncoderEval(
            data.dir, teacher.onnx, tokenizer_dir, cfg.encoder.max_length, cfg.encoder.timing_seq_len
        )
        return validate_and_release(run, candidates, evaluator, data.md5, work / "reports" / run.run_id)
