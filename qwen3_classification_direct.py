"""The model: a Qwen3 sequence classifier, its attention over packed rows, loading the backbone, attaching LoRA.

Every script builds the model only through this file. How it is saved and loaded is lft/adapter.py; the
runtime choices (dtypes, attention, compile, graphs) are lft/runtime.py; inference is lft/predict.py.

    model = Qwen3 decoder (any local Qwen3 folder, 0.6B ... 8B; config read from the folder)
            -> pool one vector per text (`last` real token, or `mean` over real tokens)
            -> dropout -> `score`, a bias-free Linear(hidden, num_labels), Xavier-uniform initialised

The 151,936-way LM head is never built, so nothing can stay tied to the input embeddings. `score` has the
name and shape of transformers' `Qwen3ForSequenceClassification.score`, which is what makes the merged
export loadable by plain transformers.

Two input layouts reach the same function:
  padded  input_ids/attention_mask (B, W); left or right padding.
  packed  input_ids/position_ids (1, T) holding B texts back to back, cu_seqlens (B+1) their offsets. With no
          attention mask, transformers derives a block-diagonal causal mask from position ids that restart at
          0 (one sample can't attend to another), so no token is spent on padding.
"""
from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

from lft import base
from lft.common import UserError, gc_paused
from lft.labels import DEFAULT_LABELS
from lft.runtime import VARLEN  # our attention implementation for packed rows on CUDA (see varlen_attention)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PAD_TOKEN = "<|endoftext|>"  # Qwen3 ships no pad token; this is the one Qwen's own configs use
# peft 0.21 still calls this transformers-5 deprecated alias on every wrap; it is noise to users
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal flash attention over a packed row, one segment per text (torch.nn.attention.varlen).

    Called by transformers' Qwen3 attention with query (1, Hq, T, D), key/value (1, Hkv, T, D) and the
    cu_seq_lens_q/max_length_q kwargs the classifier passes down. Work is sum(len_i^2), not T^2, and no mask
    tensor is built. Flash attention handles grouped KV heads natively."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    cu, max_len = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    extra = _VARLEN_KWARGS if k.shape[1] == q.shape[1] else _VARLEN_KWARGS_GQA
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **extra)
    return out.unsqueeze(0), None  # (1, T, Hq, D), as transformers' sdpa_attention_forward returns


_VARLEN_KWARGS: dict = {}
_VARLEN_KWARGS_GQA: dict = {}


def register_varlen_attention() -> None:
    """Register the varlen attention with transformers; resolve once how this torch spells 'causal'
    (2.10/2.11: is_causal=True; 2.12+: window_size=(-1, 0), and enable_gqa for grouped KV heads)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    params = inspect.signature(varlen_attn).parameters
    _VARLEN_KWARGS.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    _VARLEN_KWARGS_GQA.update(_VARLEN_KWARGS, **({"enable_gqa": True} if "enable_gqa" in params else {}))

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, lambda *args, **kwargs: None)  # segments come from cu_seqlens


def compile_decoder_layers(model: "Qwen3Classifier", backend="inductor") -> None:
    """torch.compile each decoder layer (dynamic shapes: packed rows vary in length). Fuses the RMSNorms,
    rotary embedding, SiLU gate and LoRA dropout/scale/add into a few kernels: on an H200 this doubled
    training and evaluation throughput at the default settings (bench/RESULTS.md)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # dynamic=True also makes every float attribute a graph input: RMSNorm eps, attention scaling and dropout,
    # LoRA's scaling and dropout p became 0-dim CPU tensors, so inductor built CPU kernels (C++ compiles, its CPU
    # ISA probe) beside the GPU ones: on an H200 the first 1.7B training step took 104 s with a cold compile cache
    # and 51 s with a warm one (bench/RESULTS.md run 18); as constants, 17.6 s and 2.9 s (run 19). These floats are
    # the same in every layer and never change, so one graph still serves all the layers.
    if hasattr(torch._dynamo.config, "specialize_float"):
        torch._dynamo.config.specialize_float = True
    for layer in model.base_model.layers:
        layer.compile(dynamic=True, backend=backend)
    # In training the first layer's input (the frozen embeddings' output) would not require grad while every
    # later layer's does: two compiled graphs (forward + backward each). Made to require grad, all layers share
    # one, which saves a whole compile at start-up; the cost is the first layer's input gradient (a few small
    # matmuls per step). The forward is unchanged.
    model.base_model.get_input_embeddings().register_forward_hook(_input_requires_grad)


def _input_requires_grad(module, inputs, output):
    if torch.is_grad_enabled():
        output.requires_grad_(True)


class Qwen3Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float = 0.1, pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', not {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        hidden = backbone.config.hidden_size
        self.score = nn.Linear(hidden, num_labels, bias=False, dtype=torch.float32)
        nn.init.xavier_uniform_(self.score.weight)

    @property
    def base_model(self) -> nn.Module:
        """The plain transformers Qwen3Model, inside the LoRA wrapper if there is one."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    def forward(self, input_ids, attention_mask=None, position_ids=None, cu_seqlens=None, max_len=None):
        """Logits (B, num_labels) in float32. use_cache=False: a KV cache is for generation, and with one
        transformers also stops deriving the packed (block-diagonal) mask from position ids."""
        if cu_seqlens is not None:  # packed: one row, samples back to back
            if self.backbone.config._attn_implementation == VARLEN:
                # mask mapping given as a dict: transformers builds no mask (and syncs nothing) for it
                h = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                  attention_mask={"full_attention": None}, cu_seq_lens_q=cu_seqlens,
                                  cu_seq_lens_k=cu_seqlens, max_length_q=max_len, max_length_k=max_len
                                  ).last_hidden_state[0]
            else:
                h = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False
                                  ).last_hidden_state[0]
            ends = cu_seqlens[1:].long()
            if self.pooling == "last":
                pooled = h[ends - 1]
            else:
                lens = ends - cu_seqlens[:-1].long()
                seg = torch.repeat_interleave(torch.arange(len(lens), device=h.device), lens,
                                              output_size=h.shape[0])
                pooled = torch.zeros(len(lens), h.shape[1], dtype=torch.float32, device=h.device)
                # empty segments (slots a fixed-shape row leaves unused) divide by 1, not 0: nothing reads them
                pooled = pooled.index_add_(0, seg, h.float()) / lens.clamp(min=1).unsqueeze(1)
        else:
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            if self.pooling == "last":
                # rightmost real token: correct for right padding (last 1) and left padding (position W-1)
                idx = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)
                pooled = h[torch.arange(h.shape[0], device=h.device), idx]
            else:
                m = mask.unsqueeze(-1).to(torch.float32)
                pooled = (h.float() * m).sum(1) / m.sum(1)
        return self.score(self.dropout(pooled)).float()


# --- building -------------------------------------------------------------------------------------------

def load_tokenizer(checkpoint):
    """The checkpoint's own tokenizer, offline, with the pad token set explicitly.

    A user's text is text: "<|endoftext|>" or "<think>" typed into a post encodes as the characters it is made
    of, never as a control token (<|endoftext|> is also the pad id). Qwen3 marks some added tokens (<think>,
    <tool_call>, the FIM tokens) as non-special, and a tokenizer matches those even with split_special_tokens;
    so every added token is marked special, and special tokens are split. The toolkit adds no special token to
    any text, so no string a user types can produce an added-token id."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    with gc_paused():  # transformers parses the 6 MB tokenizer.json twice
        tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True, trust_remote_code=False,
                                            split_special_tokens=True)
    backend = tok.backend_tokenizer
    backend.add_special_tokens([AddedToken(a.content, special=True, normalized=False, single_word=a.single_word,
                                           lstrip=a.lstrip, rstrip=a.rstrip)
                                for a in backend.get_added_tokens_decoder().values() if not a.special])
    backend.encode_special_tokens = True
    if tok.pad_token is None:
        tok.pad_token = PAD_TOKEN
    return tok


@contextlib.contextmanager
def tokenizer_meanwhile(checkpoint):
    """Load the checkpoint's tokenizer in a second thread for the duration of the block; yields its future. The
    tokenizer costs about a second of parsing tokenizer.json on the CPU; the block moves the weights to the
    device and checksums them, work that leaves Python's lock free, so the two overlap. Start it after the
    backbone's from_pretrained, so the two threads never import modules at the same time. On leaving the block
    the thread has finished; an error in it is raised by .result()."""
    with ThreadPoolExecutor(1, thread_name_prefix="lft-tokenizer") as pool:
        yield pool.submit(load_tokenizer, checkpoint)


def load_backbone(checkpoint, dtype=torch.float32, attn_implementation: str = "sdpa", prefix: str = ""):
    """The plain Qwen3Model of a local folder (no LM head). `prefix`: where the decoder's weights sit in the
    files ("model." in a merged Qwen3ForSequenceClassification folder); the other tensors there (the score
    head) are expected, so transformers' load report about them is not shown."""
    from transformers import Qwen3Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a local load says nothing useful
    if attn_implementation == VARLEN:
        register_varlen_attention()
    verbosity = hf_logging.get_verbosity()
    if prefix:
        hf_logging.set_verbosity_error()
    try:
        return Qwen3Model.from_pretrained(str(checkpoint), dtype=dtype, attn_implementation=attn_implementation,
                                          local_files_only=True, trust_remote_code=False, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def add_lora(model: Qwen3Classifier, r: int = 8, alpha: int = 16, dropout: float = 0.1,
             targets=LORA_TARGETS) -> Qwen3Classifier:
    """Wrap the backbone with peft LoRA adapters. Base weights freeze; adapters are kept in float32 even
    when the base is bf16/fp16 (peft's autocast_adapter_dtype); the head stays trainable."""
    from peft import LoraConfig, get_peft_model

    targets = list(targets)
    layer_modules = {n.rsplit(".", 1)[-1] for n, _ in model.backbone.named_modules()}
    unknown = [t for t in targets if t not in layer_modules]
    if not targets or unknown:
        raise UserError(f"--lora_target_modules: {', '.join(unknown) or '(none given)'} is not a module of the "
                        f"model; choose from q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model.backbone = get_peft_model(model.backbone, config, autocast_adapter_dtype=True)
    model.score.weight.requires_grad_(True)
    return model


def build_classifier(checkpoint, labels=DEFAULT_LABELS, dropout=0.1, pooling="last", dtype=torch.float32,
                     attn_implementation="sdpa", lora: dict | None = None, device="cpu", with_tokenizer=False):
    """(model on `device`, base identity) for training: base from `checkpoint`, a fresh head, LoRA if asked.
    The identity (lft.base) reads every weight, so it is taken where the model will run. `with_tokenizer`:
    (model, identity, tokenizer), the tokenizer loaded while the weights move (tokenizer_meanwhile)."""
    checkpoint = base.check_folder(checkpoint)
    backbone = load_backbone(checkpoint, dtype, attn_implementation)
    with tokenizer_meanwhile(checkpoint) if with_tokenizer else contextlib.nullcontext() as tokenizer:
        backbone.to(device)
        identity = base.identity(checkpoint, backbone)
    model = Qwen3Classifier(backbone, len(labels), dropout, pooling).to(device)
    if lora is not None:
        add_lora(model, **lora)
    return (model, identity, tokenizer.result()) if with_tokenizer else (model, identity)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
