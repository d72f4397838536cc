"""A tiny random causal LM and a character-level chat tokenizer for fast tests of code that scores or trains
through a transformers model (server/jobs/fusion_learning.py): built in memory with a fixed seed, in milliseconds."""

from __future__ import annotations

import string

import torch

from tests.helpers import random_adapter

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = list(string.ascii_lowercase + " \n")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LETTERS = string.ascii_lowercase


def tiny_tokenizer():
    """One token per character (lower-case letters, space, newline) plus the chat specials, SmolLM2's chat
    format (``<|im_start|>role\\n…<|im_end|>``), which server.jobs.training.encode_pair relies on."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", chat_template=CHAT_TEMPLATE)


def _rms_norm_in_own_dtype(norm: torch.nn.Module):
    """LlamaRMSNorm.forward without its float32 upcast (the same function, in the input's dtype)."""
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return norm.weight * (hidden_states * torch.rsqrt(variance + norm.variance_epsilon))
    return forward


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, *, layers: int = 4, init: float = 0.02):
    """A random LlamaForCausalLM (hidden 32, ``layers`` layers, 4 heads) over :func:`tiny_tokenizer`'s
    vocabulary, in eval mode. Llama computes its RMSNorms (and eager attention's softmax) in float32 whatever
    the model's dtype, which caps a float64 oracle at float32 precision (finite differences then see noise of
    about 1e-10 in the loss): here the norms compute in the model's dtype and attention is SDPA's, so a float64
    model is float64 throughout."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    vocab = len(SPECIALS) + len(CHARS)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=256, initializer_range=init,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = _rms_norm_in_own_dtype(module)
    return model


TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def linear_shapes(model, targets: tuple[str, ...] = TARGETS) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of the model's linear modules whose names end with one of ``targets``, named as PEFT keys them."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}


def tiny_skill(model, r: int, seed: int, *, alpha: float = 16, scale: float = 0.1, rslora: bool = False,
               targets: tuple[str, ...] = TARGETS):
    """A random LoRA adapter on the tiny model's modules."""
    return random_adapter(linear_shapes(model, targets), r=r, alpha=alpha, seed=seed, rslora=rslora, scale=scale)
