"""Task `style`: does the model answer in the second style (the friendly prefix) without being asked?

Metric: `style_rate`, the share of greedy replies that start with STYLE_PREFIX. Reward: `style`.
STYLE_CUE is the prompt text that asks for the style: the synthetic world writes prompts with it
(the behaviour a preference method or a steering vector should make the default), and appending it
to a prompt is the prompting baseline a steering result is compared with.
"""
from __future__ import annotations

from rollout.rewards import check_lengths, register
from tasks import GenerationTask, rate, register_task

STYLE_CUE = " Reply in a friendly way."
STYLE_PREFIX = "Happy to help! "


def is_styled(text: str) -> bool:
    """Starts with the friendly style prefix ("Happy to help!")."""
    return text.lstrip().startswith(STYLE_PREFIX.strip())


@register("style")
def style(prompts, completions, **fields) -> list[float]:
    """1.0 iff the response starts with the style prefix."""
    check_lengths(prompts, completions)
    return [1.0 if is_styled(c) else 0.0 for c in completions]


@register_task("style")
class Style(GenerationTask):
    data_format = "prompt"
    metrics = ("style_rate",)
    reward = "style"
    markers = (STYLE_PREFIX,)
    verdicts = ("styled",)
    cue = STYLE_CUE

    @staticmethod
    def judge(text: str) -> bool:
        return is_styled(text)

    def judge_all(self, texts, rows):
        return {"styled": [is_styled(t) for t in texts]}

    def summarise(self, v):
        return {"style_rate": rate(v["styled"])}
