"""DPO step time and memory: posttrain vs TRL's DPOTrainer, same model, data and settings, in one run.

    python benchmarks/bench_preference.py [--modes full,lora] [--steps N] [--warmup N] [--mem-steps N]
                                          [--grad-checkpointing] [--model DIR] [--device cpu|cuda] [--json F]

Same model (`assets/tiny-qwen3` by default: ours loads it with model.load.load_model, TRL with
AutoModelForCausalLM.from_pretrained), same data (data/synthetic/preference_train.jsonl, chat
template on both sides, taken in file order by both so step k of each side sees the same 8 pairs
padded to the same width), same settings: batch 8, max_length 256, beta 0.1, sigmoid loss, AdamW
lr 5e-5, weight decay 0, grad clipping 1.0, fp32, no gradient accumulation, no activation
checkpointing (TRL's DPOConfig turns it on by default: it is turned off here, as ours is; pass
`--grad-checkpointing` for both on). Two modes:

  full  full fine-tuning; the reference is a frozen copy (ours: trainer.models.make_reference, a deepcopy;
        TRL: a second from_pretrained of the same directory, TRL's default).
  lora  LoRA r=16, alpha=32, dropout 0 on q,k,v,o,gate,up,down; the reference is the same model
        with the adapters disabled (ours: lora.inject.apply_adapters + train.AdaptersDisabled;
        TRL: a peft LoraConfig, TRL then disables the adapter for the reference forward).

Ours, one step (trainer/loop.py's body, minimally): PairsFeed.loss_inputs (padding-free,
the product default: the 16 sequences run packed into rows with per-sequence attention, ~30% fewer
tokens than padding them to the longest; TRL pads, as its padding_free needs flash-attention) ->
losses.dpo.dpo_loss -> backward -> clip_grad_norm_ -> AdamW step (built as train.py builds it:
fused on CPU and CUDA) -> zero_grad, with the loss and metric reads train.py does. Theirs:
DPOTrainer(max_steps=...).train(); TRL tokenizes the data in its constructor, before any timing.

Timing, interleaved: our step runs inside a TrainerCallback's on_step_end, right after each TRL
step, so the two alternate step by step and share the machine's noise. TRL's step is timed
  on_step_begin -> on_step_end  forward, backward, clipping, optimizer, scheduler; leaves out TRL's
                                batch collation and logging (ours includes its collation): the
                                window most favourable to TRL, the one the target is judged on;
  e2e                           end of one TRL step to the end of the next (our step excluded):
                                what a user waits per step.
Wall clock and process CPU time are both recorded (CPU time leaves out the time other jobs held the
cores). The first `--warmup` steps are dropped; medians [minima] of the rest. Ratio = TRL / ours
(> 1: ours is faster). Target: >= 1.5 in both modes.

Memory, on steps after the timed ones (both sides' step k measured the same way):
  state       exact bytes of the tensors held for training (policy and reference parameters and
              buffers, deduplicated by storage, + optimizer state); `ref` = the reference's share:
              the frozen copy costs one set of weights, the adapter-disabled reference nothing;
  alloc peak  what a step allocates above its start: cuda max_memory_allocated, or on CPU the torch
              allocator's running total (torch.profiler memory events);
  rss peak    (CPU, Linux) resident pages a step touches above its start: malloc set to mmap blocks
              >= 64 KiB and trimmed before the step, VmHWM reset through /proc/self/clear_refs.
              Allocated-but-untouched memory does not count here (it does in alloc peak: TRL's
              chunked log-prob kernel allocates a tokens x 32768 fp32 tile even when the vocabulary,
              649 on the tiny model, fills 2% of it).
Target: ours uses less memory (state + step peak), judged on each measure.
transformers, peft and trl are imported here only; the product never imports them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

from losses import call_loss  # noqa: E402
from losses.dpo import dpo_loss  # noqa: E402
from lora.inject import DEFAULT_TARGETS, apply_adapters  # noqa: E402
from model.load import load_model  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from trainer.config import compose  # noqa: E402
from trainer.feeds import get_feed  # noqa: E402
from trainer.models import make_reference  # noqa: E402
from trainer.paths import REPO  # noqa: E402

TINY = os.path.join(REPO, "assets", "tiny-qwen3")
DATA = os.path.join(REPO, "data", "synthetic", "preference_train.jsonl")
BATCH, MAX_LEN, BETA, LR, CLIP = 8, 256, 0.1, 5e-5, 1.0
LORA = dict(rank=16, alpha=32, dropout=0.0)
TIME_TARGET = 1.5


# ------------------------------------------------------------------------------------------ memory
def state_bytes(modules, optimizer) -> int:
    """Bytes of the tensors held for training: parameters, buffers and grads of `modules` and the
    optimizer's state, each storage counted once (tied weights, a reference sharing the policy's)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if not torch.is_tensor(t):
            return
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()

    for m in modules:
        for p in m.parameters():
            add(p)
            add(p.grad)
        for b in m.buffers():
            add(b)
    for st in optimizer.state.values():
        for v in st.values():
            add(v)
    return total


class AllocPeak:
    """Peak tensor allocation inside a window, above what was allocated at its start (bytes).
    CUDA: torch.cuda.max_memory_allocated. CPU: the running total of torch.profiler's memory events.
    Counts what was allocated, touched or not. Profiling adds overhead: never on a timed step."""

    def __init__(self, device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile
            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return False
        import tempfile
        self.prof.__exit__(*exc)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            self.prof.export_chrome_trace(f.name)
            with open(f.name) as g:
                events = json.load(g)["traceEvents"]
        self.peak = max([0] + [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"])
        return False


class RssPeak:
    """CPU, Linux + glibc: peak resident memory a window touches above its start (bytes).

    malloc is told to mmap every block >= 64 KiB (so a freed tensor leaves RSS at once) and to give
    its free memory back before the window (malloc_trim), VmHWM is reset (/proc/self/clear_refs), and
    the window's peak is VmHWM - VmRSS at its start. Unlike AllocPeak, pages allocated but never
    written do not count. Changes malloc's behaviour for the rest of the process: measure last (one
    mode per process)."""

    libc = None

    @staticmethod
    def available() -> bool:
        try:
            import ctypes
            RssPeak.libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return hasattr(RssPeak.libc, "mallopt") and hasattr(RssPeak.libc, "malloc_trim")
        except OSError:
            return False

    @staticmethod
    def _kb(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def __enter__(self):
        self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed from now on)
        self.libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.base = self._kb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = (self._kb("VmHWM") - self.base) * 1024
        return False


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time leaves out the time other jobs held the
    cores: on a shared machine it is the steadier figure (single-threaded, it is the work done)."""
    return time.perf_counter(), time.process_time()


def scratch_dir() -> str:
    """TRL's output_dir (it saves nothing here: save_strategy="no"), removed at exit."""
    import atexit
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="bench_trl_")
    atexit.register(shutil.rmtree, d, True)
    return d


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- ours
class Ours:
    """posttrain's DPO: model, reference, optimizer, and one optimiser step as train.py takes it."""

    def __init__(self, model_dir: str, mode: str, device, checkpointing: bool = False):
        self.device = device
        has_tok = os.path.isfile(os.path.join(model_dir, "tokenizer.json"))
        self.model, self.tok = load_model(model_dir, dtype=torch.float32, device=device, with_tokenizer=has_tok)
        if not has_tok:
            self.tok = Tokenizer.from_dir(TINY)
        self.model.gradient_checkpointing = checkpointing
        cfg = compose(["method=dpo", f"data.train={DATA}", f"data.max_length={MAX_LEN}"])
        self.feed = get_feed(cfg.method.kind)(cfg, self.tok, device)
        self.feed.load(self.model, run_dir=".")
        self.examples = self.feed.examples
        adapters = mode == "lora"
        if adapters:
            apply_adapters(self.model, kind="lora", targets=list(DEFAULT_TARGETS), **LORA)
        self.ref = make_reference(self.model, cfg, adapters)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # as train.make_optimizer builds it (fused on CPU and CUDA)
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0, fused=device.type in ("cuda", "cpu"))
        self.model.train()
        self.i, self.ntok = 0, []

    def step(self) -> tuple[float, dict]:
        """One optimiser step on the next 8 pairs in file order (as TRL's sequential sampler); (loss, metrics)."""
        i = self.i % (len(self.examples) // BATCH)
        micro = self.examples[i * BATCH:(i + 1) * BATCH]
        self.i += 1
        inputs, n, _ = self.feed.loss_inputs(self.model, self.ref, micro)
        loss, metrics = call_loss(dpo_loss, inputs, {"beta": BETA, "loss_type": "sigmoid"})
        loss.backward()
        loss_sum = loss.item()
        logged = {k: float(v) for k, v in metrics.items() if k != "loss"}
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ntok.append(n)
        return loss_sum, logged

    def state(self) -> int:
        mods = [self.model] + ([self.ref] if isinstance(self.ref, torch.nn.Module) else [])
        return state_bytes(mods, self.opt)

    def ref_bytes(self) -> int:
        """What the reference adds on top of the policy (0 for the adapter-disabled one)."""
        return self.state() - state_bytes([self.model], self.opt)


# ------------------------------------------------------------------------------------------- theirs
def trl_trainer(model_dir: str, mode: str, device, max_steps: int, callbacks, checkpointing: bool = False):
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)

    tok_dir = model_dir if os.path.isfile(os.path.join(model_dir, "tokenizer.json")) else TINY
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = [json.loads(line) for line in open(DATA, encoding="utf-8") if line.strip()]
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                        "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                        "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                                       for r in rows])
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig
        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=scratch_dir(), per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, max_length=MAX_LEN, beta=BETA, loss_type=["sigmoid"],
                     learning_rate=LR, weight_decay=0.0, max_grad_norm=CLIP, max_steps=max_steps, bf16=False,
                     fp16=False, use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
                     logging_steps=10_000, disable_tqdm=True, train_sampling_strategy="sequential",
                     dataloader_pin_memory=False, seed=0,
                     gradient_checkpointing=checkpointing)  # TRL's default is True; ours is off: same on both sides
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config,
                         callbacks=callbacks)
    trainer.remove_callback(transformers.PrinterCallback)  # no end-of-training log dict on stdout
    return trainer


def trl_state(trainer) -> int:
    mods = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    return state_bytes(mods, trainer.optimizer)


def trl_ref_bytes(trainer) -> int:
    return trl_state(trainer) - state_bytes([trainer.model], trainer.optimizer)


def count_tokens(trainer, sink: list):
    """Record the real tokens of each TRL batch (wraps compute_loss; nothing else changes)."""
    inner = trainer.compute_loss

    def wrapped(model, inputs, *a, **k):
        sink.append(int(inputs["attention_mask"].sum()))
        return inner(model, inputs, *a, **k)

    trainer.compute_loss = wrapped


# ----------------------------------------------------------------------------------------- timing
def bench_mode(mode: str, args, device) -> dict:
    """One TRL run with ours interleaved, steps in phases: warmup (dropped), timed, then memory steps
    measured with AllocPeak, then (CPU) with RssPeak. Each phase holds both sides' step k."""
    from transformers import TrainerCallback

    ours = Ours(args.model, mode, device, args.grad_checkpointing)
    res = {k: [] for k in ("ours", "theirs", "ours_cpu", "theirs_cpu", "theirs_e2e", "alloc_ours", "alloc_theirs",
                           "rss_ours", "rss_theirs")}
    w, n, m = args.warmup, args.steps, args.mem_steps
    rss = device.type == "cpu" and RssPeak.available() if m else False
    total = w + n + m * (2 if rss else 1)

    def meter(k):
        """The memory meter of step k (None: a timed or warmup step)."""
        if k < w + n:
            return None
        return (AllocPeak(device), "alloc") if k < w + n + m else (RssPeak(), "rss")

    class Interleave(TrainerCallback):
        """TRL step k (timed on_step_begin -> on_step_end), then our step k."""
        t_after_ours = mem = None

        def on_step_begin(self, a, state, control, **kw):
            self.mem = meter(state.global_step)
            if self.mem:
                self.mem[0].__enter__()
            sync(device)
            self.t_begin = clock()

        def on_step_end(self, a, state, control, **kw):
            sync(device)
            t = clock()
            k = state.global_step - 1  # this step's index
            if self.mem:
                meter_, kind = self.mem
                meter_.__exit__(None, None, None)
                res[f"{kind}_theirs"].append(meter_.peak)
                meter_, _ = meter(k)
                with meter_:
                    ours.step()
                res[f"{kind}_ours"].append(meter_.peak)
                return
            if k >= w:
                res["theirs"].append(t[0] - self.t_begin[0])
                res["theirs_cpu"].append(t[1] - self.t_begin[1])
                res["theirs_e2e"].append(t[0] - self.t_after_ours[0])
            t0 = clock()
            ours.step()
            sync(device)
            t1 = clock()
            if k >= w:
                res["ours"].append(t1[0] - t0[0])
                res["ours_cpu"].append(t1[1] - t0[1])
            self.t_after_ours = clock()

    trainer = trl_trainer(args.model, mode, device, total, [Interleave()], args.grad_checkpointing)
    ntok_theirs = []
    count_tokens(trainer, ntok_theirs)
    trainer.train()
    res["tokens/step ours"] = statistics.mean(ours.ntok)
    res["tokens/step theirs"] = statistics.mean(ntok_theirs)
    res["state ours"], res["state theirs"] = ours.state(), trl_state(trainer)
    res["ref ours"], res["ref theirs"] = ours.ref_bytes(), trl_ref_bytes(trainer)
    return res


# ------------------------------------------------------------------------------------------- report
def med(xs):
    return statistics.median(xs)


def _ms(xs) -> str:
    return f"{med(xs) * 1e3:7.1f} [{min(xs) * 1e3:5.1f}]"


def _ratio(theirs, ours) -> str:
    return f"{med(theirs) / med(ours):6.2f}x [{min(theirs) / min(ours):4.2f}]"


def report(results: dict, device) -> bool:
    ok = True
    print(f"\nDPO step time ({device.type}), ms, medians over the timed steps [minima]; "
          f"ratio = TRL/ours (> 1: ours faster)")
    print(f"  {'':6s}{'wall clock':-^38s}  {'TRL e2e':-^24s}  {'process CPU time':-^38s}")
    print(f"  {'mode':6s}{'ours':>9s}{'TRL':>15s}{'ratio':>14s}  {'TRL':>10s}{'ratio':>14s}  {'ours':>9s}{'TRL':>15s}"
          f"{'ratio':>14s}   tokens/step ours | TRL")
    for mode, r in results.items():
        o, t, e, oc, tc = r["ours"], r["theirs"], r["theirs_e2e"], r["ours_cpu"], r["theirs_cpu"]
        ok &= med(t) / med(o) >= TIME_TARGET
        print(f"  {mode:6s}{_ms(o)}{_ms(t)}{_ratio(t, o)}  {med(e) * 1e3:10.1f}{_ratio(e, o)}  {_ms(oc)}{_ms(tc)}"
              f"{_ratio(tc, oc)}   {r['tokens/step ours']:.0f} | {r['tokens/step theirs']:.0f}")
    print(f"  target: wall-clock ratio (on_step_begin -> on_step_end, the window most favourable to TRL) "
          f">= {TIME_TARGET} in every mode -> {'MET' if ok else 'NOT MET'}")

    MB = 2 ** 20
    kinds = [k for k in ("alloc", "rss") if all(r[f"{k}_ours"] for r in results.values())]
    n_mem = len(next(iter(results.values()))["alloc_ours"])
    alloc = "cuda max_memory_allocated" if device.type == "cuda" else "torch allocator (profiler)"
    print(f"\nDPO memory, MB: state = tensors held (policy + reference + optimizer state; ref = the reference's "
          f"share); step peak = median over {n_mem} steps of what a step adds above its start: alloc = {alloc}"
          + ("; rss = resident pages touched (VmHWM)" if "rss" in kinds else ""))
    head = "".join(f"{k + ' peak ours':>17s}{'TRL':>8s}" for k in kinds)
    print(f"  {'mode':6s}{'state ours':>12s}{'TRL':>8s}{'ref ours':>10s}{'TRL':>8s}" + head)
    verdict = {k: True for k in kinds}
    for mode, r in results.items():
        row = (f"  {mode:6s}{r['state ours'] / MB:12.2f}{r['state theirs'] / MB:8.2f}"
               f"{r['ref ours'] / MB:10.2f}{r['ref theirs'] / MB:8.2f}")
        for k in kinds:
            a, b = med(r[f"{k}_ours"]) / MB, med(r[f"{k}_theirs"]) / MB
            verdict[k] &= r["state ours"] / MB + a < r["state theirs"] / MB + b
            row += f"{a:17.2f}{b:8.2f}"
        print(row)
    if "full" in results and "lora" in results:
        print(f"  ours: the adapter-disabled reference (lora) adds {results['lora']['ref ours'] / MB:.2f} MB, "
              f"the frozen copy (full) {results['full']['ref ours'] / MB:.2f} MB")
    for k, v in verdict.items():
        print(f"  target: ours uses less memory (state + {k} step peak) in every mode -> {'MET' if v else 'NOT MET'}")
    return ok and all(verdict.values())


def run_child(mode: str) -> dict:
    """This script with `--modes MODE` (the other arguments as given) in a fresh process; its figures."""
    import subprocess
    import tempfile
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in ("--modes", "--json"):
            skip = True
        elif not a.startswith(("--modes=", "--json=")):
            argv.append(a)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--modes", mode, "--json", f.name],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{mode} run failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        with open(f.name) as g:
            return json.load(g)[mode]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--model", default=TINY, help="HF model directory (tokenizer from it, else the tiny one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads for both sides (default 1: on a shared machine, OpenMP threads "
                         "that wait on each other make a tiny model's steps 10-30x slower)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side and mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps per side and mode")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps per memory measure, after the timed ones")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="activation checkpointing on both sides (default off on both; TRL's own default is on)")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    import transformers
    import trl
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"device {device}, threads {torch.get_num_threads()}, "
          f"gradient checkpointing {'on' if args.grad_checkpointing else 'off'} (both sides); model {args.model}")
    results = {}
    modes = args.modes.split(",")
    for mode in modes:
        if len(modes) == 1:
            results[mode] = bench_mode(mode, args, device)
        else:  # one process per mode: the rss measure changes malloc's settings for the rest of its process
            results[mode] = run_child(mode)
        r = results[mode]
        print(f"  {mode}: ours {med(r['ours']) * 1e3:.1f} ms, TRL {med(r['theirs']) * 1e3:.1f} ms"
              f" ({time.perf_counter() - t_start:.0f} s)", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    report(results, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
