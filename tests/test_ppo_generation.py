from __future__ import annotations

import torch
from transformers import OPTConfig, OPTForCausalLM

from rlhf_tasks.ppo.generation import GenerationSettings, answer_mask, generate

EOS, PAD = 2, 1


def test_answer_mask_keeps_up_to_first_eos_even_when_pad_is_eos():
    answers = torch.tensor([[5, 6, EOS, EOS, EOS],   # eos, then padding that equals eos
                            [EOS, 7, 8, 9, 9],       # empty answer: only the eos counts
                            [5, 6, 7, 8, 9]])        # ran out of tokens: no eos at all
    assert answer_mask(answers, EOS).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_generate_masks_align_with_log_probs():
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=32, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=1, num_attention_heads=2,
                    ffn_dim=32, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS)
    model = OPTForCausalLM(cfg)
    prompts = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10]])  # left-padded (B, P)
    mask = (prompts != PAD).long()
    ro = generate(model, prompts, mask, GenerationSettings(max_new_tokens=6), EOS, PAD)
    B, T = ro.sequences.shape
    P = ro.prompt_len
    assert P == 4 and T <= P + 6
    assert ro.action_mask.shape == (B, T - 1)
    assert ro.action_mask[:, : P - 1].sum() == 0  # prompt positions never count as actions
    # action t predicts token t+1: the action mask is the attention mask of the answer, shifted by one
    torch.testing.assert_close(ro.action_mask[:, P - 1:], ro.attention_mask[:, P:])
    # everything after an answer's eos is padding with attention 0
    for b in range(B):
        ans = ro.sequences[b, P:]
        n = int(ro.attention_mask[b, P:].sum())
        assert (ans[n:] == PAD).all()
    assert (ro.answer_lengths >= 1).all()
