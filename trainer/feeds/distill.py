"""Kind `distill`: on-policy distillation from a frozen teacher (method=opd, method=gkd).

One step, top to bottom (`collect`):
  1. prompts: this rank's share, as the RL feeds draw them;
  2. samples: with probability `lmbda` the STUDENT samples the completions (on-policy), otherwise the
     TEACHER does (GKD's student/teacher data mix; OPD uses lmbda = 1: always the student). The
     student's log-probs of the sampled tokens are the "old" policy (one no-grad forward when the
     teacher sampled);
  3. rewards: the configured rewards are computed for the metrics only (`reward`, rewards/NAME/mean):
     the training signal is the teacher, not the reward;
  4. episodes (rollout/episode.py), advantage 0.
Loss inputs (`loss_inputs`), whatever the loss's signature asks for, from one student forward with
gradient and one teacher forward without:
    teacher_logps                      log π_t of the sampled tokens (opd_loss: reverse KL per token)
    student_hidden / teacher_hidden,   the final hidden states at the completion positions and both
    student_weight / teacher_weight    lm_heads (gkd_loss: JSD_β over the full distributions, chunked)
The teacher is any model directory with the student's tokenizer (`teacher: DIR`), loaded once in
setup_model on the student's device and dtype and never trained; adapters on the student work (the
reference is not used). Under torchrun each rank holds a whole copy of the teacher.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from losses.common import masked_mean
from rollout.episode import Episode, stack
from rollout.sampler import generate
from trainer import distributed
from trainer.config import ConfigError, opt, register_options
from trainer.feeds import register_feed
from trainer.feeds.rollouts import RolloutFeed, RolloutMethod
from trainer.forward import completion_states, policy_logprobs, shared_prompt_logprobs
from trainer.paths import repo_path


@register_options("distill")
@dataclass
class DistillMethod(RolloutMethod):
    """On-policy distillation: the student samples, a frozen teacher scores every position."""
    teacher: str = opt("???", "the teacher: a HF model directory (or hub id) with the student's tokenizer")
    lmbda: float = opt(1.0, "share of steps whose completions the student samples (the rest: the teacher)",
                       min=0, max=1)
    reward: list[str] = opt(["math_answer"], "rewards logged as metrics (they do not train the student)")


@register_feed("distill")
class DistillFeed(RolloutFeed):
    progress_metrics = ("reward", "reverse_kl")

    def __init__(self, cfg, tok, device, rank: int = 0, world: int = 1):
        super().__init__(cfg, tok, device, rank, world)
        self.mix = torch.Generator().manual_seed(cfg.seed + 7919)
        params = inspect.signature(self.loss_fn).parameters
        self.wants_hidden = "teacher_hidden" in params
        if not self.wants_hidden and "teacher_logps" not in params:
            raise ConfigError(f"method.loss: {self.m.loss!r} takes neither teacher_logps nor teacher_hidden; a "
                              "distillation loss needs one of them")

    def setup_model(self, model) -> None:
        from model.load import load_model

        w = model.model.embed_tokens.weight
        self.teacher, ttok = load_model(repo_path(self.m.teacher), dtype=w.dtype, device=w.device)
        self.teacher.requires_grad_(False)
        probe = "What is 12 + 7? Answer: 19. Happy to help!"
        if self.teacher.config.vocab_size != model.config.vocab_size or ttok.encode(probe) != self.tok.encode(probe):
            raise ConfigError(f"method.teacher={self.m.teacher}: its tokenizer or vocabulary differs from the student's "
                              f"({self.teacher.config.vocab_size} vs {model.config.vocab_size} rows); distillation "
                              "compares the two distributions token by token")
        distributed.log(f"[posttrain] teacher {self.m.teacher} ({sum(p.numel() for p in self.teacher.parameters()):,} "
                        "parameters, frozen)")

    @torch.no_grad()
    def collect(self, model):
        """Sample with the student (probability lmbda) or the teacher; the student's old log-probs."""
        m, tok, G = self.m, self.tok, self.m.num_generations
        t0 = time.perf_counter()
        picked = self.draw(m.prompts_per_step)
        rows, ids = [self.rows[i] for i in picked], [self.prompt_ids[i] for i in picked]
        self.seed += 1
        on_policy = bool(torch.rand((), generator=self.mix) < m.lmbda)
        roll = generate(model if on_policy else self.teacher, ids, self.sampling(), tok.stop_token_ids,
                        tok.pad_token_id, num_samples=G, seed=self.seed * self.world + self.rank, tokenizer=tok)
        rewards, parts = self.rewards(rows, roll.texts(tok)) if self.reward_fns else (torch.zeros(len(ids) * G), {})
        width = roll.mask.shape[1]
        episodes = []
        for k in range(len(ids) * G):
            prompt, n = ids[k // G], int(roll.mask[k].sum())
            episodes.append(Episode(seq=prompt + roll.completion_ids[k, :n].tolist(), prompt_len=len(prompt),
                                    mask=roll.mask[k].cpu(), old_logps=roll.logprobs[k].cpu(),
                                    advantage=torch.zeros(()), reward=float(rewards[k])))
        if not on_policy:  # the sampler's log-probs are the teacher's: the student's old policy is a forward
            old = policy_logprobs(model, [e.prompt_len for e in episodes], [e.seq for e in episodes], width,
                                  tok.pad_token_id, m.temperature)[0].cpu()
            for e, row in zip(episodes, old):
                e.old_logps = row * e.mask
        metrics = {f"rewards/{name}/mean": r.mean().item() for name, r in parts.items()}
        metrics.update({"reward": rewards.mean().item(), "student_sampled": float(on_policy),
                        "completion_length/mean": roll.mask.sum(1).mean().item(),
                        "truncated_ratio": roll.truncated.float().mean().item(), "rollout_s": time.perf_counter() - t0})
        return episodes, metrics

    def loss_inputs(self, model, ref, micro: list[Episode]):
        tok, dev, T = self.tok, self.device, self.m.temperature
        width = micro[0].mask.shape[0]
        seqs, plens = [e.seq for e in micro], [e.prompt_len for e in micro]
        mask = stack(micro, "mask", dev)
        inputs = {"mask": mask, "old_logps": stack(micro, "old_logps", dev), "num_items_in_batch": self.num_items}
        if self.wants_hidden:
            h, _ = completion_states(model, plens, seqs, width, tok.pad_token_id)
            with torch.no_grad():
                th, _ = completion_states(self.teacher, plens, seqs, width, tok.pad_token_id)
            inputs.update(student_hidden=h, student_weight=model.lm_head_weight, teacher_hidden=th,
                          teacher_weight=self.teacher.lm_head_weight)
            return inputs, sum(len(s) for s in seqs), {}
        logps, ent = policy_logprobs(model, plens, seqs, width, tok.pad_token_id, T, with_entropy=True)
        with torch.no_grad():
            inputs["teacher_logps"] = shared_prompt_logprobs(self.teacher, plens, seqs, width, tok.pad_token_id, T)
        inputs["logps"] = logps
        return inputs, sum(len(s) for s in seqs), {"entropy": float(masked_mean(ent.detach(), mask))}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mix": self.mix.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.mix.set_state(state["mix"])
