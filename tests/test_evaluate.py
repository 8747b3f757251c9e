"""evaluate.py: two real runs of the embedded model -> the six files, numbers that agree, clear errors."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
from data.formats import DataError
from evaluate import EvalError, load_for_eval, main, parse_args
from evaluation.metrics import Evaluator, generate_texts, perplexity
from tasks.arithmetic import is_correct
from tasks.harmful import is_refusal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the embedded model is tiny: one thread per process is many times faster than two on a shared CPU
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = os.path.join(REPO, "assets", "tiny-qwen3")
SYNTH = os.path.join(REPO, "data", "synthetic")


def head(src, dst, n):
    with open(src, encoding="utf-8") as f:
        lines = f.readlines()[:n]
    dst.write_text("".join(lines), encoding="utf-8")
    return str(dst)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short real runs (SFT and DPO) of the embedded model, on small training files."""
    root = tmp_path_factory.mktemp("runs")
    train = {"sft": head(os.path.join(SYNTH, "sft_train.jsonl"), root / "sft.jsonl", 24),
             "dpo": head(os.path.join(SYNTH, "preference_train.jsonl"), root / "pref.jsonl", 24)}
    dirs, procs = [], []
    for method in ("sft", "dpo"):  # both at once: each is mostly start-up time
        run_dir = root / f"{method}_run"
        cmd = [sys.executable, os.path.join(REPO, "train.py"), f"method={method}", "method.max_steps=3",
               "method.batch_size=4", f"data.train={train[method]}", "eval_before=false", "eval_after=false",
               "progress=false", f"hydra.run.dir={run_dir}"]
        procs.append(subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=ENV))
        dirs.append(run_dir)
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output[-3000:]
    return dirs


@pytest.fixture(scope="module")
def evaluated(runs, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("eval_out")
    cmd = [sys.executable, os.path.join(REPO, "evaluate.py"), f"run={runs[0]}", f"compare=[{runs[1]}]",
           f"out={out_dir}", "max_examples=6", "max_new_tokens=12", "samples=2", "kl_examples=4"]
    out = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stats = json.loads((out_dir / "evaluation_stats.json").read_text())
    samples = json.loads((out_dir / "sample_responses.json").read_text())
    return out_dir, stats, samples


def test_two_runs_write_all_six_files(evaluated):
    out_dir, stats, _ = evaluated
    for name in evaluate.OUTPUT_FILES:
        path = out_dir / name
        assert path.is_file() and path.stat().st_size > 500, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats["model_comparison"]["models"] == ["base", "sft_run", "dpo_run"]
    assert stats["settings"]["base"] == "assets/tiny-qwen3"  # the runs' own starting model, from .hydra


def test_stats_hold_the_numbers_behind_the_plots(evaluated, runs):
    _, stats, _ = evaluated
    for run_dir, label in zip(runs, ("sft_run", "dpo_run")):
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curve = stats["training_curves"][label]
        assert curve["steps"] == [r["step"] for r in rows] == [0, 1, 2]
        for key in ("loss", "grad_norm", "lr"):  # every numeric key is kept, plotted or not
            assert curve["series"][key] == pytest.approx([r[key] for r in rows])
        assert curve["plotted"][0] == "loss"
    assert stats["training_curves"]["sft_run"]["method"] == "sft"
    assert {"rewards/margins", "rewards/accuracies"} <= set(stats["training_curves"]["dpo_run"]["plotted"])
    for label in ("base", "sft_run", "dpo_run"):
        m = stats["models"][label]["metrics"]
        assert {"accuracy", "format_rate", "style_rate", "refusal_rate", "preference_accuracy", "perplexity",
                "kl"} <= set(m)
        mean_length = pytest.approx(stats["response_lengths"][label]["mean"], abs=1e-3)
        assert stats["model_comparison"]["values"][label] == {**m, "mean_response_length": mean_length}
        for section in ("perplexity_distribution", "response_lengths"):
            h = stats[section][label]
            counts, _ = np.histogram(h["values"], h["edges"])
            assert h["counts"] == counts.tolist() and sum(h["counts"]) == h["n"] == len(h["values"])
        ppl = stats["perplexity_distribution"][label]
        assert ppl["n"] == 6
        # the token-weighted perplexity of eval.json is the per-example ones recombined
        nll = sum(math.log(p) * t for p, t in zip(ppl["values"], ppl["tokens"]))
        assert math.exp(nll / sum(ppl["tokens"])) == pytest.approx(m["perplexity"], abs=1e-3)
        lengths = stats["response_lengths"][label]
        assert lengths["n"] == 6 * 3 and max(lengths["values"]) <= 12  # three generation sets, max_new_tokens
    assert stats["models"]["base"]["metrics"]["kl"] == 0.0
    assert stats["models"]["base"]["metrics"]["preference_accuracy"] == 0.5  # relative to itself
    assert stats["models"]["dpo_run"]["relative_to_base"] is True


def test_figures_show_exactly_what_the_json_holds(evaluated):
    from evaluation import plots

    _, stats, _ = evaluated
    fig = plots.training_curves(stats["training_curves"])
    shown = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            shown[(ax.get_title(), line.get_label())] = (list(line.get_xdata()), list(line.get_ydata()))
    loss_title = plots.CURVE_LABELS["loss"][0]
    for label, curve in stats["training_curves"].items():
        assert shown[(loss_title, label)] == (curve["steps"], pytest.approx(curve["series"]["loss"]))
        for key in curve["plotted"]:
            assert shown[(plots.CURVE_LABELS[key][0], label)][1] == pytest.approx(curve["series"][key])
    for section, fn in (("perplexity_distribution", plots.perplexity_distribution),
                        ("response_lengths", plots.response_lengths)):
        ax = fn(stats[section]).axes[0]
        steps = [p for p in ax.patches if hasattr(p, "get_data")]
        assert len(steps) == 3
        for patch, (label, h) in zip(steps, stats[section].items()):
            values, edges, _ = patch.get_data()
            assert values.tolist() == h["counts"] and edges.tolist() == pytest.approx(h["edges"])
            assert patch.get_label().startswith(label)
    fig = plots.model_comparison(stats["model_comparison"])
    rates_ax = fig.axes[0]
    assert [t.get_text() for t in rates_ax.get_legend().get_texts()] == stats["model_comparison"]["models"]
    for container, label in zip(rates_ax.containers, stats["model_comparison"]["models"]):
        values = stats["model_comparison"]["values"][label]
        shown_rates = [m for m in plots.RATE_METRICS if m in values]
        assert shown_rates[:2] == ["accuracy", "format_rate"]
        assert [b.get_height() for b in container] == pytest.approx([values[m] for m in shown_rates])
    ppl_ax = next(ax for ax in fig.axes if ax.get_title() == plots.OTHER_METRICS["perplexity"][0])
    assert [b.get_height() for b in ppl_ax.containers[0]] == pytest.approx(
        [stats["model_comparison"]["values"][m]["perplexity"] for m in stats["model_comparison"]["models"]])
    for ax in fig.axes:  # readable as they are: every panel has a title and a y label
        assert ax.get_title() and ax.get_ylabel()


def test_sample_responses_hold_each_models_generation(evaluated):
    _, stats, samples = evaluated
    assert samples["models"] == ["base", "sft_run", "dpo_run"]
    assert [s["set"] for s in samples["samples"]] == ["arithmetic"] * 2 + ["style"] * 2 + ["harmful"] * 2
    first = samples["samples"][0]
    assert first["prompt"] and first["answer"]
    for label in samples["models"]:
        r = first["responses"][label]
        assert isinstance(r["text"], str) and 1 <= r["tokens"] <= 12
        assert r["correct"] == is_correct(r["text"], first["answer"])
        assert r["tokens"] == stats["response_lengths"][label]["values"][0]
    harmful = samples["samples"][-1]["responses"]["base"]
    assert harmful["refusal"] == is_refusal(harmful["text"])


def test_run_directory_without_metrics_is_a_clear_error(runs, tmp_path):
    broken = tmp_path / "no_metrics_run"
    shutil.copytree(runs[0], broken)
    (broken / "metrics.jsonl").unlink()
    out = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), f"run={broken}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert f"{broken}: no metrics.jsonl" in out.stderr and str(broken / "metrics.jsonl") in out.stderr
    assert not list(tmp_path.glob("**/*.png"))  # nothing half-written


def test_a_model_that_cannot_be_loaded_is_a_clear_error(runs, tmp_path, capsys):
    def error(*argv):
        assert main(list(argv)) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
        return err

    empty = tmp_path / "empty"
    empty.mkdir()
    err = error(f"run={empty}")
    assert "cannot load a model" in err and "checkpoints" in err and "config.json" in err
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(TINY, "config.json"), no_weights)
    err = error(f"run={no_weights}", "base=none")
    assert "cannot load the model" in err and "model.safetensors" in err
    unfinished = tmp_path / "unfinished_run"
    unfinished.mkdir()
    shutil.copy(runs[0] / "metrics.jsonl", unfinished)
    err = error(f"run={unfinished}")
    assert str(unfinished / "checkpoints" / "final") in err and "did the run finish" in err
    err = error(f"run={tmp_path / 'missing' / 'dir'}", "base=none")
    assert "no such directory" in err
    err = error(f"run={runs[0]}", f"compare=[{empty}]")  # one bad target: nothing is evaluated
    assert str(empty) in err
    assert error("run=x", "bogus=1").startswith("error: unknown argument 'bogus=1'")
    assert "nothing to evaluate" in error()


def test_parse_args():
    o = parse_args(["run=a", "compare=[b, c]", "data=[x.jsonl,sft:y.jsonl]", "max_examples=5", "curves=false"])
    assert o["targets"] == ["a", "b", "c"] and o["data"] == ["x.jsonl", "sft:y.jsonl"]
    assert o["max_examples"] == 5 and o["curves"] is False and o["base"] == "auto"
    with pytest.raises(EvalError, match="whole number"):
        parse_args(["run=a", "max_examples=many"])


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_for_eval(TINY, device="cpu", dtype="fp32")[:2]
    torch.set_num_threads(threads)


def test_evaluator_details_agree_with_its_metrics_and_the_old_functions(tiny):
    model, tok = tiny
    files = {"arithmetic": os.path.join(SYNTH, "grpo_eval.jsonl"), "sft": os.path.join(SYNTH, "sft_eval.jsonl")}
    ev = Evaluator(tok, files, max_examples=4, kl_examples=2, max_new_tokens=12)
    metrics, details = ev.evaluate(model)
    assert ev(model) == metrics  # __call__ (what train.py uses) is evaluate()'s metrics
    assert details["arithmetic"]["texts"] == generate_texts(model, tok, details["arithmetic"]["prompts"], 12)
    assert metrics["perplexity"] == pytest.approx(perplexity(model, tok, next(t for t in ev.tasks if t.set_name == "sft").rows), abs=1e-4)
    assert metrics["accuracy"] == sum(details["arithmetic"]["correct"]) / 4
    assert all(0 < n <= 12 for n in details["arithmetic"]["lengths"])


def test_data_argument_sniffs_the_held_out_set(tmp_path):
    files = evaluate.held_out_files([os.path.join(SYNTH, "grpo_eval.jsonl"), os.path.join(SYNTH, "sft_eval.jsonl"),
                                     os.path.join(SYNTH, "preference_eval.jsonl"),
                                     "harmful:" + os.path.join(SYNTH, "harmful_eval.jsonl")], [])
    assert sorted(files) == ["arithmetic", "harmful", "preference", "sft"]
    with pytest.raises(EvalError, match="harmful:"):
        evaluate.held_out_files([os.path.join(SYNTH, "harmful_eval.jsonl")], [])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected a JSON object"):
        evaluate.held_out_files([str(bad)], [])


def test_adapter_directory_loads_its_base_and_adapters(tiny, tmp_path):
    from lora.inject import apply_adapters
    from lora.peft_io import save_adapter
    from model.load import load_model

    model, tok = load_model(TINY, dtype="fp32", device="cpu")
    apply_adapters(model, kind="lora", rank=4, alpha=8, targets=["q_proj", "v_proj"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter_dir = tmp_path / "adapter"
    save_adapter(model, str(adapter_dir), base_model_name_or_path="assets/tiny-qwen3", tokenizer=tok)
    loaded, _, info = load_for_eval(str(adapter_dir), device="cpu", dtype="fp32")
    assert info == {"adapter": True, "base_model": "assets/tiny-qwen3"}
    ids = torch.tensor([tok.encode("What is 3 + 4?")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
        assert not torch.allclose(loaded(ids), tiny[0](ids))
