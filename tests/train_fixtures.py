"""A tiny random model, its greedy sequences and their teacher features, shared by the training tests."""
from types import SimpleNamespace

import torch

from kangaroo_fast.models import pack_model
from kangaroo_fast.train.data import frequent_tokens, teacher_features
from kangaroo_fast.train.distill import init_adapter


def synthetic_setup(exit_layer: int = 2, n_seqs: int = 24, prompt_len: int = 5, new_tokens: int = 20):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=123, hidden_size=48, intermediate_size=100, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3, eos_token_id=1, pad_token_id=0)
    hf = LlamaForCausalLM(config).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    sequences = []
    for _ in range(n_seqs):
        ids = torch.randint(3, 123, (1, prompt_len), generator=gen)
        out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        sequences.append(out[0].tolist())
    packed = pack_model(hf)
    features = teacher_features(packed, sequences, [exit_layer], 8, 8, progress=False)
    vocab = frequent_tokens(features, 48, config.vocab_size, {1})
    adapter = init_adapter(packed.config, packed.final_norm, vocab, exit_layer, seed=0)
    split = n_seqs * 3 // 4
    return SimpleNamespace(hf=hf, packed=packed, sequences=sequences, features=features, adapter=adapter,
                           train_idx=list(range(split)), heldout_idx=list(range(split, n_seqs)),
                           lm_head=packed.lm_head.float(), cos=packed.rope_cos, sin=packed.rope_sin,
                           prompt_len=prompt_len, new_tokens=new_tokens)
