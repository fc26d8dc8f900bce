from __future__ import annotations

import math

import pytest
import torch
from transformers import OPTConfig, OPTModel

from rlhf_tasks.algorithms.maths.preference import pairwise_loss
from rlhf_tasks.runtime.lora import apply_lora, merge_lora, plain_state_dict
from rlhf_tasks.runtime.models import RewardModel, last_token_index, positions_from_mask, read_score


def test_score_is_read_at_last_real_token_for_both_padding_sides():
    values = torch.arange(12, dtype=torch.float32).view(2, 6)  # (B, T)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    assert last_token_index(right).tolist() == [2, 5]
    assert read_score(values, right).tolist() == [2.0, 11.0]
    assert last_token_index(left).tolist() == [5, 4]
    assert read_score(values, left).tolist() == [5.0, 10.0]


def test_positions_start_at_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_pairwise_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # Swapping the pair costs more.
    assert pairwise_loss(rejected, chosen) > pairwise_loss(chosen, rejected)


def _tiny_backbone() -> OPTModel:
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=64, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=2, num_attention_heads=2,
                    ffn_dim=32, max_position_embeddings=64, pad_token_id=1)
    return OPTModel(cfg)


def test_reward_model_save_load_roundtrip_and_padding_invariance(tmp_path):
    rm = RewardModel(_tiny_backbone()).eval()
    torch.nn.init.normal_(rm.v_head.weight)
    ids = torch.randint(3, 64, (1, 7))
    mask = torch.ones_like(ids)
    # The same sequence, right-padded by 3 tokens, scores the same.
    padded = torch.cat([ids, torch.ones(1, 3, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        s1, s2 = rm.score(ids, mask), rm.score(padded, pmask)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    rm.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").is_file() and (tmp_path / "rm" / "value_head.safetensors").is_file()
    again = RewardModel.from_pretrained(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.score(ids, mask), s1)


def test_reward_model_from_plain_lm_starts_at_zero(tmp_path):
    _tiny_backbone().save_pretrained(tmp_path / "lm")
    rm = RewardModel.from_pretrained(str(tmp_path / "lm"))
    ids = torch.randint(3, 64, (2, 5))
    assert rm.score(ids, torch.ones_like(ids)).abs().max().item() == 0.0


def test_lora_targets_named_layers_and_merges():
    base = _tiny_backbone()
    model = apply_lora(base, lora_dim=4, module_name="layers.1.", only_optimize_lora=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "layers.1." in n for n in trainable)
    with pytest.raises(ValueError, match="matches no Linear"):
        apply_lora(_tiny_backbone(), 4, "no.such.module")
    merged = merge_lora(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_seed_recipe_models_load_from_local_directories(tmp_path, tiny_model_dir):
    """The opt-1.3b preset pointed at local copies (no download) passes prepare's model
    check, through AutoConfig/AutoTokenizer.from_pretrained on those directories."""
    from transformers import AutoTokenizer, OPTConfig

    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.pipeline.prepare import check_models

    dims = {"opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                             word_embed_proj_dim=2048),
            "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                             word_embed_proj_dim=512)}
    for name, d in dims.items():
        OPTConfig(vocab_size=50272, **d).save_pretrained(tmp_path / name)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "opt-1.3b")
    cfg = PipelineConfig.load("opt-1.3b", [f"model.actor={tmp_path / 'opt-1.3b'}",
                                           f"model.rm={tmp_path / 'opt-350m'}"])
    info, tok = check_models(cfg)
    assert info["actor"]["model_type"] == info["rm"]["model_type"] == "opt"
    assert tok.eos_token_id is not None


# -- other architectures: LoRA defaults and the attention fallback --------------------------

def _tiny_config(arch: str):
    """A 2-layer, 16-wide random-init config of each architecture (no download)."""
    import transformers as T

    common = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "opt": lambda: T.OPTConfig(hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=2, num_attention_heads=2,
                                   ffn_dim=32, max_position_embeddings=64, **common),
        "gpt2": lambda: T.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **common),
        "llama": lambda: T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, max_position_embeddings=64, **common),
        "qwen2": lambda: T.Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, max_position_embeddings=64, **common),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=64, **common),
        "bloom": lambda: T.BloomConfig(hidden_size=16, n_layer=2, n_head=2, **common),
    }[arch]()


ARCHS = ["opt", "gpt2", "llama", "qwen2", "gpt_neox", "bloom"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head", ["causal_lm", "backbone"])
def test_lora_default_targets_every_block_projection(arch, head):
    """lora_module_name's default ('auto') adapts the attention and MLP projections of
    every transformer block, whatever the architecture names them, and nothing outside
    them (embeddings, lm_head); the merged model computes what the adapted one did, and
    its weights are what plain_state_dict (the PPO EMA's view) reads off the adapted one."""
    from transformers import AutoModel, AutoModelForCausalLM

    from rlhf_tasks.config import PipelineConfig
    from rlhf_tasks.runtime.lora import lora_targets

    cfg = PipelineConfig.load("tiny-cpu")
    assert cfg.sft.lora_module_name == cfg.ppo.actor.lora_module_name == cfg.ppo.critic.lora_module_name == "auto"
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if head == "causal_lm" else AutoModel).from_config(_tiny_config(arch)).eval()
    targets = lora_targets(model, "auto")
    per_layer = len(targets) // 2
    assert per_layer >= 4 and len(targets) == 2 * per_layer, targets  # q/k/v or fused qkv, out, 2+ MLP
    assert not any("lm_head" in n or "emb" in n or "wte" in n for n in targets)
    ids = torch.randint(3, 64, (2, 6))
    lora = apply_lora(model, 4, cfg.sft.lora_module_name, only_optimize_lora=True)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in lora.named_parameters():  # make the adapters do something
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        out = lora(input_ids=ids).last_hidden_state if head == "backbone" else lora(input_ids=ids).logits
        plain = {k: v.clone() for k, v in plain_state_dict(lora).items()}
        merged = merge_lora(lora)
        again = merged(input_ids=ids).last_hidden_state if head == "backbone" else merged(input_ids=ids).logits
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(again, out, atol=1e-4, rtol=1e-4)
    merged_sd = merged.state_dict()
    assert sorted(plain) == sorted(merged_sd)
    for k, v in merged_sd.items():
        torch.testing.assert_close(plain[k], v, msg=k)


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_attention_falls_back_to_eager_only_where_sdpa_is_missing(arch, tmp_path, caplog):
    """Bloom has no sdpa kernel: the actor and the reward model still load (eager, with
    a warning naming the directory); Llama keeps sdpa."""
    from transformers import AutoModelForCausalLM

    from rlhf_tasks.runtime.models import load_causal_lm

    AutoModelForCausalLM.from_config(_tiny_config(arch)).save_pretrained(tmp_path / arch)
    with caplog.at_level("WARNING", logger="rlhf_tasks.runtime.models"):
        lm = load_causal_lm(str(tmp_path / arch), attn_implementation="sdpa")
        rm = RewardModel.from_pretrained(str(tmp_path / arch), attn_implementation="sdpa")
    want = "eager" if arch == "bloom" else "sdpa"
    assert lm.config._attn_implementation == want and rm.backbone.config._attn_implementation == want
    fell_back = [r for r in caplog.records if "falling back to eager" in r.getMessage()]
    assert len(fell_back) == (2 if arch == "bloom" else 0)
    if fell_back:
        assert str(tmp_path / arch) in fell_back[0].getMessage()
    ids = torch.randint(3, 64, (1, 5))
    assert torch.isfinite(rm.score(ids, torch.ones_like(ids))).all()


def test_other_attention_errors_are_not_swallowed(tmp_path):
    from rlhf_tasks.runtime.models import load_causal_lm

    with pytest.raises(OSError):
        load_causal_lm(str(tmp_path / "missing-model"), attn_implementation="sdpa")
