"""The reward model as an MLflow pyfunc scoring model: ``mlflow.pyfunc.load_model`` (or
``mlflow models serve``) on it scores answers, as the pipeline's reward model does.

Input: rows with ``prompt`` (the data's DeepSpeed-Chat text, ``"\\n\\nHuman: ...\\n\\nAssistant:"``)
and ``answer``; output: one score per row. Each row is tokenised as the reward model's stage
tokenised its pairs (the prompt rendered with the tokenizer's chat template where the run used
one, the answer, EOS) and scored at its last token. Imported only where a model is logged or
loaded (it imports mlflow).
"""

from __future__ import annotations

import mlflow.pyfunc


class RewardScorer(mlflow.pyfunc.PythonModel):
    """Loads the reward model from the artifact ``reward_model``; model_config
    ``chat_template`` is the run's ``model.chat_template``."""

    def load_context(self, context) -> None:
        from ..data.chat import renderer
        from ..runtime.models import RewardModel, load_tokenizer

        path = context.artifacts["reward_model"]
        self.tok = load_tokenizer(path)
        self.render = renderer(self.tok, (context.model_config or {}).get("chat_template", "auto"))
        self.rm = RewardModel.from_pretrained(path).eval()

    def predict(self, context, model_input, params=None):  # no type hints: the signature is given when logged
        import torch

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        prompts = self.render.encode_prompts([str(r["prompt"]) for r in rows])
        answers = self.tok([self.render.answer(str(r["answer"])) for r in rows], add_special_tokens=False)["input_ids"]
        scores = []
        with torch.no_grad():
            for p, a in zip(prompts, answers, strict=True):
                ids = torch.tensor([p + a + [self.tok.eos_token_id]])
                scores.append(float(self.rm.score(ids, torch.ones_like(ids))[0]))
        return scores


def log_scorer(model_id: str, reward_model_dir: str, chat_template: str, requirements: list[str]) -> None:
    """Log :class:`RewardScorer` with the reward model's directory as its artifact (one copy,
    in the LoggedModel's artifacts) into the LoggedModel ``model_id`` (tracking URI set by
    the caller)."""
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame({"prompt": ["\n\nHuman: Hello\n\nAssistant:"], "answer": [" Hello! How can I help?"]})
    mlflow.pyfunc.log_model(name="reward-model", python_model=RewardScorer(),
                            artifacts={"reward_model": reward_model_dir}, model_id=model_id,
                            signature=infer_signature(example, [0.0]), model_config={"chat_template": chat_template},
                            pip_requirements=requirements)
