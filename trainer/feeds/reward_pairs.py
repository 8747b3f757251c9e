"""Kind `reward_pairs`: preference pairs for a reward model (Bradley-Terry, losses/reward.py).

The model gets a scalar `score` head (setup_model; saved as *ForSequenceClassification) read on
each sequence's last real token. Loss inputs: chosen_rewards, rejected_rewards (B,). A reward model
is judged on held-out pairs, not by generating: its evaluation is the share of held-out pairs
scored chosen > rejected (`preference_accuracy`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from data.formats import collate, read_jsonl
from losses.reward import sequence_rewards
from model.load import add_score_head
from trainer.config import ConfigError, register_options
from trainer.feeds import DatasetFeed, DatasetMethod, register_feed
from trainer.feeds.pairs import tokenize_pairs
from trainer.forward import to_device
from trainer.paths import repo_path


@register_options("reward_pairs")
@dataclass
class RewardPairsMethod(DatasetMethod):
    """A reward model trained on preference pairs."""


@register_feed("reward_pairs")
class RewardPairsFeed(DatasetFeed):
    def load(self, model, run_dir: str) -> None:
        path = self.training_file()
        self.examples = tokenize_pairs(read_jsonl(path, "preference"), self.tok, self.cfg.data.max_length, path)

    def setup_model(self, model) -> None:
        if hasattr(model, "score"):
            return
        add_score_head(model)
        torch.nn.init.normal_(model.score.weight, std=model.config.hidden_size ** -0.5)
        model.score.to(device=self.device, dtype=model.model.embed_tokens.weight.dtype)

    def sequences(self, example) -> list[dict]:
        return [example["chosen"], example["rejected"]]

    def loss_inputs(self, model, ref, micro):
        seqs = [e["chosen"] for e in micro] + [e["rejected"] for e in micro]
        b = to_device(collate(seqs, self.tok.pad_token_id), self.device)
        r = sequence_rewards(model, lambda h: model.score(h).squeeze(-1), b["input_ids"], b["attention_mask"])
        B = len(micro)
        return {"chosen_rewards": r[:B], "rejected_rewards": r[B:]}, int(b["attention_mask"].sum()), {}

    def evaluator(self, default):
        spec = (self.cfg.data.eval or {}).get("preference")
        path = spec.get("path") if isinstance(spec, dict) else spec
        if path is None:
            raise ConfigError("method=reward needs a held-out preference set (data.eval.preference=FILE)")
        path = repo_path(path)
        rows = read_jsonl(path, "preference")[:self.cfg.eval_max_examples]
        examples = tokenize_pairs(rows, self.tok, self.cfg.data.max_length, path)

        @torch.no_grad()
        def pairwise_accuracy(model) -> dict:
            was_training = model.training
            model.eval()
            wins = []
            for i in range(0, len(examples), 32):
                inputs, _, _ = self.loss_inputs(model, None, examples[i:i + 32])
                wins += (inputs["chosen_rewards"] > inputs["rejected_rewards"]).tolist()
            model.train(was_training)
            return {"preference_accuracy": round(sum(wins) / len(wins), 4)}

        return pairwise_accuracy
