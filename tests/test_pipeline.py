"""pipeline.py: stages chain checkpoints and stop at the first failed gate, keeping the last good model."""
import json
import os

from trainer.pipeline import run_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["method.max_steps=2", "method.batch_size=4", "data.eval.style=null", "data.eval.harmful=null",
        "data.eval.sft=null", "data.eval.preference=null"]


def test_pipeline_stops_at_an_impossible_gate_and_keeps_the_last_good_model(tmp_path, capsys):
    stages = [
        {"name": "first", "method": "sft", "overrides": FAST, "gates": {"format_rate": 0.0}},
        {"name": "second", "method": "sft", "overrides": FAST, "gates": {"accuracy": 1.01}},
        {"name": "never", "method": "sft", "overrides": FAST, "gates": {}},
    ]
    report = run_pipeline(stages, os.path.join(REPO, "assets", "tiny-qwen3"), str(tmp_path),
                          ["progress=false", "eval_max_examples=8", "eval_before=false"])
    assert report["passed"] is False and report["stopped_at"] == "second"
    assert set(report["missed"]) == {"accuracy"} and report["missed"]["accuracy"]["threshold"] == 1.01
    assert [s["name"] for s in report["stages"]] == ["first", "second"]  # the third never ran
    first_final = os.path.join(str(tmp_path), "1_first", "checkpoints", "final")
    assert report["result"] == first_final and os.path.isfile(os.path.join(tmp_path, "final", "model.safetensors"))
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    assert saved["stopped_at"] == "second"
    out = capsys.readouterr().out
    assert "stopped at stage 'second': accuracy missed" in out


def test_every_shipped_pipeline_stage_composes_to_a_valid_config():
    """Each stage of configs/pipeline/*.yaml names a method config and overrides that Hydra accepts,
    and every gate names a metric the stage's evaluation reports."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import parse, register_hydra

    register_hydra()

    metrics = {"accuracy", "format_rate", "style_rate", "refusal_rate", "preference_accuracy", "preference_gap",
               "perplexity", "kl", "multistep_accuracy", "process_score"}
    names = [f[:-5] for f in sorted(os.listdir(os.path.join(REPO, "configs", "pipeline"))) if f.endswith(".yaml")]
    checked = 0
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
        for name in names:
            stages = compose("config", overrides=[f"pipeline={name}"]).pipeline.stages
            stages = OmegaConf.to_container(stages) if stages else []
            for stage in stages:
                cfg = parse(compose("config", overrides=[f"method={stage['method']}", *stage.get("overrides", [])]))
                assert cfg.method.name and cfg.method.lr > 0
                assert set(stage.get("gates") or {}) <= metrics, (name, stage["name"])
                checked += 1
    assert checked >= 3  # sft_grpo_dpo has three stages
