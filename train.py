"""One entry point for every method: `python train.py method=grpo [key=value ...]`.

How a config becomes a run:

    configs/config.yaml + method/ model/ data/ lora/ pipeline/     Hydra composes the YAML
        -> trainer/config.py parse()      typed, every key and value checked; nothing loaded yet
        -> method.program                 trainer.run:train for the trained methods,
                                          steering.run:steer / :abliterate for the two programs
        -> trainer/run.py train()         model (trainer/models.py) -> feed of method.kind
                                          (trainer/feeds/) -> loop (trainer/loop.py) -> eval (tasks/)
                                          -> checkpoints/final, eval.json
A pipeline (`pipeline=sft_grpo_dpo`) runs each stage as its own `train.py` process instead
(trainer/pipeline.py). Bad input of any kind ends the run with one line on stderr and exit 1.
"""
from __future__ import annotations

import sys

import hydra

from trainer.config import ConfigError, import_object, parse, register_hydra

register_hydra()  # the `_<kind>` bases the method YAMLs start from


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(raw) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from trainer import distributed
    from trainer.loop import OutOfMemory

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    try:
        try:
            cfg = parse(raw)
        except ConfigError as e:
            raise ConfigError(f"method={hc.runtime.choices.get('method')}: {e}") from None
        if cfg.pipeline.stages:
            from trainer.pipeline import run_pipeline

            common = [f"seed={cfg.seed}", f"device={cfg.device}", f"progress={cfg.progress}",
                      f"eval_max_examples={cfg.eval_max_examples}", *logger_overrides(cfg.logger)]
            report = run_pipeline(cfg.pipeline.stages, cfg.model.path, run_dir, common)
            if not report["passed"]:
                sys.exit(2)
            return report
        return import_object(cfg.method.program)(cfg, run_dir)
    except (ValueError, OSError, NotImplementedError, OutOfMemory, FloatingPointError, RecursionError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.close()


def logger_overrides(logger) -> list[str]:
    """The run's trackers and their options as overrides for each pipeline stage."""
    import dataclasses
    import json

    on = [f.name for f in dataclasses.fields(logger) if getattr(logger, f.name) is not None]
    out = [f"logger=[{','.join(on)}]"] if on else []
    for name in on:
        for key, value in dataclasses.asdict(getattr(logger, name)).items():
            text = "null" if value is None else json.dumps(value) if isinstance(value, list) else value
            out.append(f"logger.{name}.{key}={text}")
    return out


def check_run_dir(argv: list[str]) -> None:
    """Hydra creates the run directory before main() runs and answers a read-only or impossible path
    with a traceback: try it first and say it in one line."""
    from trainer.run import check_writable

    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    try:
        check_writable(given[-1] if given else "runs")
    except ValueError as e:
        print(f"error: {e}; choose another with hydra.run.dir=DIR", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    check_run_dir(sys.argv[1:])
    main()
