"""The model: Qwen3's decoder, a sequence classifier on it, its attention over packed rows, loading, LoRA.

Every script builds the model only through this file. How it is saved and loaded is lft/adapter.py; the
runtime choices (dtypes, attention, compile, graphs) are lft/runtime.py; inference is lft/predict.py.

    model = Qwen3 decoder (any local Qwen3 folder, 0.6B ... 8B; config read from the folder; written here, with
            transformers' names and numerics and peft's LoRA layout: see "the decoder" below)
            -> pool one vector per text (`last` real token, or `mean` over real tokens)
            -> dropout -> `score`, a bias-free Linear(hidden, num_labels), Xavier-uniform initialised

The 151,936-way LM head is never built, so nothing can stay tied to the input embeddings. `score` has the
name and shape of transformers' `Qwen3ForSequenceClassification.score`, which is what makes the merged
export loadable by plain transformers.

Two input layouts reach the same function:
  padded  input_ids/attention_mask (B, W); left or right padding.
  packed  input_ids/position_ids (1, T) holding B texts back to back, cu_seqlens (B+1) their offsets: flash
          attention over each text's segment on CUDA (varlen), else a block-diagonal causal mask from the
          position ids that restart at 0. One sample can't attend to another, and no token is spent on padding.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lft import base
from lft.common import UserError, gc_paused, read_json_object
from lft.labels import DEFAULT_LABELS
from lft.runtime import VARLEN  # flash attention over packed rows on CUDA (see varlen_attention)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAD_TOKEN = "<|endoftext|>"  # Qwen3 ships no pad token; this is the one Qwen's own configs use


# --- the decoder -------------------------------------------------------------------------------------------
# Qwen3's decoder written here rather than taken from transformers: importing transformers' Qwen3 model and peft
# costs 4-5 s of every start on an H200 host (they pull in torch._dynamo, torch.distributed.tensor, scipy and
# torchao whether or not a job needs them; bench/RESULTS.md runs 29, 38). Module and parameter names are
# transformers' (layers.N.self_attn.q_proj, ...), so a Qwen3 folder's safetensors load as they are and a merged
# export is a plain transformers model; the LoRA layers keep peft's names and its adapter format. tests/test_model.py
# checks both against transformers and peft themselves.

class Qwen3Config:
    """What the decoder reads from a folder's config.json; `raw` is the whole file (the merged export writes it
    back). Configurations the decoder does not implement are refused with one line."""

    def __init__(self, raw: dict, attn_implementation: str = "sdpa", where: str = "config.json"):
        self.raw = dict(raw)
        try:
            self.hidden_size = int(raw["hidden_size"])
            self.intermediate_size = int(raw["intermediate_size"])
            self.num_hidden_layers = int(raw["num_hidden_layers"])
            self.num_attention_heads = int(raw["num_attention_heads"])
            self.num_key_value_heads = int(raw.get("num_key_value_heads") or self.num_attention_heads)
            self.head_dim = int(raw.get("head_dim") or self.hidden_size // self.num_attention_heads)
            self.vocab_size = int(raw["vocab_size"])
            self.rms_norm_eps = float(raw.get("rms_norm_eps", 1e-6))
            self.max_position_embeddings = int(raw.get("max_position_embeddings", 32768))
            rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
            if not isinstance(rope, dict):
                raise TypeError("rope_parameters")
            self.rope_theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise UserError(f"{where}: a field is missing or malformed ({e}); is this a Qwen3 config?") from None
        self.model_type = raw.get("model_type")
        self.attention_bias = bool(raw.get("attention_bias", False))
        self.tie_word_embeddings = raw.get("tie_word_embeddings")
        self.attn_implementation = attn_implementation
        unsupported = []
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            unsupported.append(f"rope type {rope.get('rope_type') or rope.get('type')!r}")
        if raw.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act {raw['hidden_act']!r}")
        if raw.get("use_sliding_window") and raw.get("sliding_window"):
            unsupported.append("sliding-window attention")
        if self.num_attention_heads % self.num_key_value_heads:
            unsupported.append(f"{self.num_attention_heads} query heads over {self.num_key_value_heads} KV heads")
        if unsupported:
            raise UserError(f"{where}: {', '.join(unsupported)} is not supported (Qwen3 models use default RoPE, "
                            "SiLU and full attention)")

    def __repr__(self) -> str:
        return (f"Qwen3Config(layers={self.num_hidden_layers}, hidden={self.hidden_size}, heads="
                f"{self.num_attention_heads}/{self.num_key_value_heads}, attn={self.attn_implementation})")


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalised in float32, cast back, then scaled (transformers' order of operations)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with RMSNorm on each head's query and key, then RoPE (Qwen3)."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        c, bias = config, config.attention_bias
        self.config = config
        self.head_dim, self.scaling = c.head_dim, c.head_dim ** -0.5
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cu_seqlens=None, max_len=None):
        """x (B, T, hidden); cos/sin (B, T, head_dim). Packed rows on CUDA (`cu_seqlens`): flash attention over
        each text's segment, laid out (T, heads, head_dim) as it wants, with no transposes. Otherwise sdpa or
        eager over (B, heads, T, head_dim), with `mask` (bool, True = may attend) or causal when None."""
        B, T = x.shape[:2]
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim))
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cu_seqlens is not None and self.config.attn_implementation == VARLEN:
            out = varlen_attention(q[0], k[0], v[0], cu_seqlens, max_len, self.scaling).unsqueeze(0)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            groups = q.shape[1] // k.shape[1]
            if groups > 1:  # as transformers' repeat_kv: every query head reads its group's KV head
                k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
            if self.config.attn_implementation == "eager":
                out = eager_attention(q, k, v, mask, self.scaling)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                     scale=self.scaling)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(B, T, -1))


def eager_attention(q, k, v, mask, scaling):
    """Attention by matmuls, softmax in float32 (transformers' eager path): for GPUs and dtypes sdpa lacks."""
    scores = (q @ k.transpose(2, 3)) * scaling
    T = q.shape[2]
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def varlen_attention(q, k, v, cu_seqlens, max_len, scaling):
    """Causal flash attention over a packed row, one segment per text (torch.nn.attention.varlen): q (T, Hq, D),
    k/v (T, Hkv, D). Work is sum(len_i^2), not T^2, and no mask tensor is built. Flash attention handles grouped
    KV heads natively."""
    from torch.nn.attention.varlen import varlen_attn

    extra = _VARLEN_KWARGS if k.shape[1] == q.shape[1] else _VARLEN_KWARGS_GQA
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scaling, **extra)


_VARLEN_KWARGS: dict = {}
_VARLEN_KWARGS_GQA: dict = {}


def resolve_varlen() -> None:
    """Resolve once how this torch spells 'causal' for varlen_attn (2.10/2.11: is_causal=True; 2.12+:
    window_size=(-1, 0), and enable_gqa for grouped KV heads)."""
    if _VARLEN_KWARGS:  # resolved: left as it is, so compiled graphs' guards on these dicts keep holding
        return
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    _VARLEN_KWARGS.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    _VARLEN_KWARGS_GQA.update(_VARLEN_KWARGS, **({"enable_gqa": True} if "enable_gqa" in params else {}))


class MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cu_seqlens=None, max_len=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cu_seqlens, max_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Decoder(nn.Module):
    """Qwen3's decoder without an LM head (transformers' Qwen3Model): token ids -> final-normed hidden states."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        # The embeddings and inv_freq are left uncomputed: load_backbone reads the weights and new_backbone draws them,
        # and both set inv_freq on the device. On the meta device (load_backbone builds there) nn.Embedding's normal_
        # and inv_freq's arithmetic go through torch._refs, which imports torch._dynamo: 1.2-2.4 s of a job that
        # never compiles (a CPU job; on a GPU the varlen attention kernel imports it anyway)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)

    def _inv_freq(self, device=None):
        dim, theta = self.config.head_dim, self.config.rope_theta
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def rope(self, position_ids, dtype):
        """cos, sin (B, T, head_dim) of the positions, computed in float32 and cast (transformers' rotary)."""
        with torch.autocast(position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cu_seqlens=None, max_len=None):
        """Hidden states (B, T, hidden). Padded: `attention_mask` (B, T), 1 for real tokens, either padding side.
        Packed: one row (1, T), `position_ids` restarting at 0 for each text and `cu_seqlens` its offsets; a text
        never attends to another."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, -1)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        mask = None
        if cu_seqlens is not None:
            if self.config.attn_implementation != VARLEN:
                mask = packed_mask(position_ids)
        elif attention_mask is not None:
            mask = padded_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cu_seqlens, max_len)
        return self.norm(x)


def packed_mask(position_ids):
    """(1, 1, T, T) bool: causal within each text of a packed row, where a text starts wherever the position ids do
    not go up by one (as transformers finds packed sequences)."""
    first = position_ids[:, :1] - 1
    seg = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal).unsqueeze(1)


def padded_mask(attention_mask):
    """(B, 1, T, T) bool: causal over real tokens. A padding position attends to itself, so that no row of the
    softmax is empty (an empty row gives NaN, and mean pooling's 0 * NaN would spread it); nothing reads it."""
    T = attention_mask.shape[-1]
    real = attention_mask.bool()
    eye = torch.eye(T, dtype=torch.bool, device=real.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    return ((causal & real[:, None, :]) | eye).unsqueeze(1)


# --- LoRA (peft's layout and arithmetic) --------------------------------------------------------------------

class LoraLinear(nn.Module):
    """A frozen Linear plus a low-rank update, as peft's lora.Linear computes it:
    base(x) + B(A(dropout(x))) * scaling, x cast to the adapter's dtype (float32) first and the sum cast back to
    the base's. Names as peft's (base_layer, lora_A.default, lora_B.default), so quantisation filters, the
    identity of the base and the adapter files see the same model. A is Kaiming-uniform and B zero, drawn in
    peft's order (each Linear's own init, then A again), so a seed gives peft's adapters."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        a = nn.Linear(base_layer.in_features, r, bias=False)
        b = nn.Linear(r, base_layer.out_features, bias=False)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        device = base_layer.weight.device
        self.lora_A = nn.ModuleDict({"default": a.to(device)})
        self.lora_B = nn.ModuleDict({"default": b.to(device)})

    def forward(self, x):
        result = self.base_layer(x)
        a = self.lora_A["default"]
        x = x.to(a.weight.dtype)
        return (result + self.lora_B["default"](a(self.lora_dropout["default"](x))) * self.scaling).to(result.dtype)

    def delta_weight(self):
        """B @ A * scaling in float32: what merging adds to the base weight."""
        return (self.lora_B["default"].weight.float() @ self.lora_A["default"].weight.float()) * self.scaling


def lora_layers(module: nn.Module) -> list[tuple[str, LoraLinear]]:
    """(name, layer) of every LoRA layer, in model order; names as in the decoder ('layers.0.self_attn.q_proj')."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLinear)]


def merge_lora(decoder: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight (in place: W += B @ A * scaling, summed in float32 and rounded
    once to W's dtype, as peft's merge) and put the plain Linear back. Returns `decoder`."""
    for name, layer in lora_layers(decoder):
        with torch.no_grad():
            layer.base_layer.weight += layer.delta_weight().to(layer.base_layer.weight.device)
        parent, child = _parent(decoder, name)
        setattr(parent, child, layer.base_layer)
    return decoder


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (root.get_submodule(path) if path else root), child


def _compile_settings() -> None:
    """dynamo's settings for the decoder layers (compile_decoder_layers, warm_compile): process-wide."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # dynamic=True also makes every float attribute a graph input: RMSNorm eps, attention scaling and dropout,
    # LoRA's scaling and dropout p became 0-dim CPU tensors, so inductor built CPU kernels (C++ compiles, its CPU
    # ISA probe) beside the GPU ones: on an H200 the first 1.7B training step took 104 s with a cold compile cache
    # and 51 s with a warm one (bench/RESULTS.md run 18); as constants, 17.6 s and 2.9 s (run 19). These floats are
    # the same in every layer and never change, so one graph still serves all the layers.
    if hasattr(torch._dynamo.config, "specialize_float"):
        torch._dynamo.config.specialize_float = True
    deterministic_inductor()


def deterministic_inductor() -> None:
    """Inductor's deterministic mode, unless TORCHINDUCTOR_DETERMINISTIC says otherwise. By default inductor times
    several block sizes and warp counts of a reduction (the RMSNorms) on the GPU at its first run and keeps the
    fastest; those change the order of the sums, so two runs of one command could train to different numbers (on
    an H200 two identical runs' third losses differed, 3.232 against 3.164: bench/RESULTS.md run 53) and pick
    best_model by different validation scores (two runs with equal losses: macro-F1 0.16061 against 0.16111, run
    55). In its deterministic mode the choice is made by rule, from the shapes alone; there, runs from empty
    compile caches gave equal losses and scores, training 1.2% slower, evaluation 3% faster, compiling ~1.6 s
    sooner (run 55)."""
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_DETERMINISTIC" not in os.environ and hasattr(inductor_config, "deterministic"):
        inductor_config.deterministic = True


def compile_decoder_layers(model: "Qwen3Classifier", backend="inductor") -> None:
    """torch.compile each decoder layer (dynamic shapes: packed rows vary in length). Fuses the RMSNorms,
    rotary embedding, SiLU gate and LoRA dropout/scale/add into a few kernels: on an H200 this doubled
    training and evaluation throughput at the default settings (bench/RESULTS.md)."""
    _compile_settings()
    for layer in model.base_model.layers:
        layer.compile(dynamic=True, backend=backend)
    # In training the first layer's input (the frozen embeddings' output) would not require grad while every
    # later layer's does: two compiled graphs (forward + backward each). Made to require grad, all layers share
    # one, which saves a whole compile at start-up; the cost is the first layer's input gradient (a few small
    # matmuls per step). The forward is unchanged.
    model.base_model.get_input_embeddings().register_forward_hook(_input_requires_grad)


def warm_compile(config: Qwen3Config, dtype, lora: dict | None, texts: int, max_len: int, device, autocast,
                 backend="inductor") -> None:
    """Compile the decoder layers' training graph (forward and backward) on a stand-in layer of `config`, before
    the model exists: one graph serves every layer (compile_decoder_layers), this one's too, so the model's first
    compiled forward finds it made. train_lora.py runs it in a thread while the weights load. Both hold Python's
    lock much of the time, so the overlap is partial: on an H200 the load took 2.6-3.4 s beside it instead of
    1.1-1.4 s, and the compile and memory probe 1.8-2.1 s instead of 3.9-4.4 s with a warm compile cache (the first
    step 9.22-10.09 s after launch, mean 9.57 s of 4 runs, against 9.85 and 10.10 s without it); cold, load and
    compile took 12.9-13.3 s against 12.8-13.0 s without it on other machines (bench/RESULTS.md runs 48-52).

    The row is the memory probe's (`texts` texts of `max_len` tokens, packed), in training mode under
    `autocast()`, with the layer's inputs as the model gives them (the embeddings' dtype, requiring grad). The
    stand-in is built on the meta device and zero-filled on `device`: no number is drawn from the CPU's random
    generator, which the model's LoRA and head initialisation use meanwhile; its dropout draws from the GPU's,
    which training re-seeds before its first step. Packed rows only (padded batches compile as before)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the current device is per thread
    if config.attn_implementation == VARLEN:
        resolve_varlen()  # read while tracing: the model's load would resolve it only later
    _compile_settings()
    with torch.device("meta"):
        layer = DecoderLayer(config).to(dtype)
        if lora is not None:
            layer.requires_grad_(False)
            _put_lora(layer, **lora)
    layer = layer.to_empty(device=device)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    layer.train()
    layer.compile(dynamic=True, backend=backend)
    T = texts * max_len
    x = torch.zeros(1, T, config.hidden_size, dtype=dtype, device=device, requires_grad=True)
    cos = torch.ones(1, T, config.head_dim, dtype=dtype, device=device)
    cu = torch.arange(0, T + 1, max_len, dtype=torch.int32, device=device)
    position_ids = torch.arange(max_len, device=device).repeat(texts).unsqueeze(0)
    mask = None if config.attn_implementation == VARLEN else packed_mask(position_ids)
    with autocast():
        out = layer(x, cos, torch.zeros_like(cos), mask, cu, max_len)
    out.float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    def base_model(self) -> Qwen3Decoder:
        """The decoder (LoRA layers sit inside it, in place of the projections they adapt)."""
        return self.backbone

    def forward(self, input_ids, attention_mask=None, position_ids=None, cu_seqlens=None, max_len=None):
        """Logits (B, num_labels) in float32."""
        if cu_seqlens is not None:  # packed: one row, samples back to back
            h = self.backbone(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens, max_len=max_len)[0]
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
            h = self.backbone(input_ids, attention_mask=attention_mask)
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

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


class Tokenizer:
    """A Qwen3 folder's tokenizer.json through the `tokenizers` library, with the part of transformers' tokenizer
    API the toolkit uses (`tok(text)["input_ids"]`, pad_token(_id), decode, backend_tokenizer, save_pretrained).
    The ids are transformers' own (tests/test_model.py compares them on hostile strings); it costs ~0.4 s where
    transformers' AutoTokenizer cost ~1.4 s (its import, and tokenizer.json parsed twice; 2-core machine)."""

    def __init__(self, backend, pad_token: str, folder: Path):
        self.backend_tokenizer = backend
        self.pad_token = pad_token
        self.pad_token_id = backend.token_to_id(pad_token)
        self.folder = folder

    def __call__(self, text, add_special_tokens: bool = False) -> dict:
        """{"input_ids": ids} of a text, or a list of id lists of a list of texts; never cut or padded: if
        something set truncation or padding on the backend, a copy without them encodes (as transformers' call
        undoes them), and the backend stays as it is."""
        backend = self.backend_tokenizer
        if backend.truncation is not None or backend.padding is not None:
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        if isinstance(text, str):
            return {"input_ids": backend.encode(text, add_special_tokens=add_special_tokens).ids}
        return {"input_ids": [e.ids for e in backend.encode_batch(list(text), add_special_tokens=add_special_tokens)]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, folder) -> None:
        """The checkpoint's tokenizer files as they are, with the pad token recorded in tokenizer_config.json."""
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                (Path(folder) / name).write_bytes((self.folder / name).read_bytes())
        path = Path(folder) / "tokenizer_config.json"
        config = read_json_object(path, "download the model again") if path.is_file() else {}
        path.write_text(json.dumps({**config, "pad_token": self.pad_token}, ensure_ascii=False, indent=2),
                        encoding="utf-8")


def load_tokenizer(checkpoint) -> Tokenizer:
    """The checkpoint's own tokenizer (tokenizer.json), offline, with the pad token set explicitly (the folder's
    tokenizer_config.json pad_token, else <|endoftext|>).

    A user's text is text: "<|endoftext|>" or "<think>" typed into a post encodes as the characters it is made
    of, never as a control token (<|endoftext|> is also the pad id). Qwen3 marks some added tokens (<think>,
    <tool_call>, the FIM tokens) as non-special, and a tokenizer matches those even with split_special_tokens;
    so every added token is marked special, and special tokens are split. The toolkit adds no special token to
    any text, so no string a user types can produce an added-token id."""
    from tokenizers import Tokenizer as Backend

    folder = Path(checkpoint)
    if not (folder / "tokenizer.json").is_file():  # vocab.json + merges.txt only: transformers builds it
        return _transformers_tokenizer(folder)
    try:
        backend = Backend.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises its own exception type for a malformed file
        raise UserError(f"--checkpoint {folder}: tokenizer.json cannot be loaded ({str(e).splitlines()[0][:120]})"
                        ) from None
    text_only(backend)
    backend.no_truncation()
    backend.no_padding()
    pad = PAD_TOKEN
    config = folder / "tokenizer_config.json"
    if config.is_file():
        given = read_json_object(config, "download the model again").get("pad_token")
        given = given.get("content") if isinstance(given, dict) else given
        pad = given if isinstance(given, str) and given else PAD_TOKEN
    if backend.token_to_id(pad) is None:
        raise UserError(f"--checkpoint {folder}: the pad token {pad!r} of tokenizer_config.json is not in the "
                        "vocabulary")
    return Tokenizer(backend, pad, folder)


def text_only(backend) -> None:
    """Mark every added token special and split special tokens (load_tokenizer's docstring says why)."""
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(a.content, special=True, normalized=False, single_word=a.single_word,
                                           lstrip=a.lstrip, rstrip=a.rstrip)
                                for a in backend.get_added_tokens_decoder().values() if not a.special])
    backend.encode_special_tokens = True


def _transformers_tokenizer(folder: Path) -> Tokenizer:
    """A folder without tokenizer.json: transformers' AutoTokenizer builds the fast tokenizer from vocab.json and
    merges.txt; the result is wrapped as load_tokenizer's (same special-token rules)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    backend = tok.backend_tokenizer
    text_only(backend)
    pad = tok.pad_token or PAD_TOKEN
    if backend.token_to_id(pad) is None:
        raise UserError(f"--checkpoint {folder}: the pad token {pad!r} is not in the vocabulary")
    return Tokenizer(backend, pad, folder)


@contextlib.contextmanager
def tokenizer_meanwhile(checkpoint):
    """Load the checkpoint's tokenizer in a second thread for the duration of the block; yields its future. The
    tokenizer costs about a second of parsing tokenizer.json on the CPU; the block reads the weights onto the
    device and checksums them, work that leaves Python's lock free, so the two overlap. On leaving the block the
    thread has finished; an error in it is raised by .result()."""
    with ThreadPoolExecutor(1, thread_name_prefix="lft-tokenizer") as pool:
        yield pool.submit(load_tokenizer, checkpoint)


def read_config(folder, attn_implementation: str = "sdpa") -> Qwen3Config:
    path = Path(folder) / "config.json"
    return Qwen3Config(read_json_object(path, "download the model again"), attn_implementation, where=str(path))


def weight_files(folder) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = read_json_object(index, "download the model again")["weight_map"].values()
        return [folder / n for n in sorted(set(names))]
    return sorted(folder.glob("*.safetensors"))


def load_backbone(checkpoint, dtype=torch.float32, attn_implementation: str = "sdpa", prefix: str = "",
                  device="cpu") -> Qwen3Decoder:
    """The decoder of a local Qwen3 folder (no LM head), its weights in `dtype` on `device`. On the CPU they are
    views of the memory-mapped files until something copies them ("auto": as stored); on a GPU they are read
    straight into its memory (read_to_gpu). Tensors are found whether named as a Qwen3Model's or under "model."
    (Qwen3ForCausalLM, or a merged Qwen3ForSequenceClassification folder: `prefix`); the LM head and a score head
    are not read. The folder is expected to have passed lft.base.check_folder, which checked every tensor's
    presence and shape."""
    config = read_config(checkpoint, attn_implementation)
    if attn_implementation == VARLEN:
        resolve_varlen()
    device = torch.device(device)
    with torch.device("meta"):
        decoder = Qwen3Decoder(config)
    want = {n for n, _ in decoder.named_parameters()}
    with gc_paused():
        if device.type == "cuda" and dtype != "auto":
            state = read_to_gpu(weight_files(checkpoint), want, prefix or "model.", dtype, device)
        else:
            state = read_mapped(weight_files(checkpoint), want, prefix or "model.", dtype)
        missing = sorted(want - set(state))
        if missing:
            raise UserError(f"--checkpoint {checkpoint}: {len(missing)} tensor(s) missing from the weights, e.g. "
                            f"{', '.join(missing[:3])}")
        decoder.load_state_dict(state, strict=True, assign=True)
    decoder.inv_freq = decoder._inv_freq(device)
    return decoder.to(device).eval()  # a no-op unless the mapped path read them for another device


def read_mapped(files, want: set[str], prefix: str, dtype) -> dict[str, torch.Tensor]:
    """{name: tensor} of the wanted tensors, as views of the memory-mapped files (safetensors), cast to `dtype`
    unless "auto"."""
    from safetensors import safe_open

    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix(prefix)
                if name in want:
                    t = f.get_tensor(key)
                    state[name] = t if dtype == "auto" else t.to(dtype)
    return state


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
READ_CHUNK = 32 << 20  # bytes one read fills in a pinned host buffer before it is copied to the GPU
READ_THREADS = 4  # readers at once, each with two pinned buffers and a CUDA stream of its own


def read_to_gpu(files, want: set[str], prefix: str, dtype, device) -> dict[str, torch.Tensor]:
    """{name: tensor on `device`} of the wanted tensors, read from the safetensors files by READ_THREADS threads in
    chunks of READ_CHUNK bytes into pinned host buffers, each chunk copied to the GPU while the thread reads its
    next one (reads and copies leave Python's lock free, so the threads run in parallel). Every tensor's memory
    is allocated before the first copy: an allocation that has to ask the driver for memory can wait for copies
    in flight. Mapping the files and copying tensor by tensor (what safetensors and transformers do) faults the
    pages in 4 KiB at a time and copies from pageable memory: 2.0-3.6 s for Qwen3-1.7B's 3.4 GB on an H200 host
    (bench/RESULTS.md). Tensors stored in another dtype are cast on the GPU afterwards, one at a time, each
    freeing its stored bytes as it goes (the peak is the larger of the stored and the cast model, plus a tensor)."""
    import ctypes
    import threading

    # tensors: (name, raw, stored dtype, shape); chunks: (fd, file offset, raw, offset, size, path); open files
    tensors, chunks, handles = [], [], []
    try:
        for path in files:
            header, data = base.safetensors_header(path)
            fd = os.open(path, os.O_RDONLY)
            handles.append(fd)
            for key, info in header.items():
                if key == "__metadata__" or key.removeprefix(prefix) not in want:
                    continue
                stored = SAFETENSORS_DTYPES.get(info["dtype"])
                if stored is None:
                    raise UserError(f"{path}: {key} is stored as {info['dtype']}, not a float type this toolkit reads")
                start, end = info["data_offsets"]
                raw = torch.empty(end - start, dtype=torch.uint8, device=device)
                tensors.append((key.removeprefix(prefix), raw, stored, info["shape"]))
                chunks += [(fd, data + start + o, raw, o, min(READ_CHUNK, end - start - o), path)
                           for o in range(0, end - start, READ_CHUNK)]
        chunks.sort(key=lambda c: (c[0], c[1]))  # in file order: sequential reads for the page cache
        todo, lock, errors = iter(chunks), threading.Lock(), []

        def reader():
            buffers = [torch.empty(READ_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            views = [memoryview((ctypes.c_char * READ_CHUNK).from_address(b.data_ptr())).cast("B") for b in buffers]
            copied = [torch.cuda.Event(), torch.cuda.Event()]
            stream, turn = torch.cuda.Stream(device), 0
            try:
                while not errors:
                    with lock:
                        chunk = next(todo, None)
                    if chunk is None:
                        break
                    fd, at, raw, offset, size, path = chunk
                    copied[turn].synchronize()  # this buffer's last copy is done: it may be overwritten
                    if os.preadv(fd, [views[turn][:size]], at) != size:
                        raise UserError(f"{path}: ends inside a tensor; the download is incomplete")
                    with torch.cuda.stream(stream):
                        raw[offset:offset + size].copy_(buffers[turn][:size], non_blocking=True)
                        copied[turn].record(stream)
                    turn = 1 - turn
            except BaseException as e:  # noqa: BLE001 - raised again by the caller
                errors.append(e)
            finally:
                for event in copied:
                    event.synchronize()  # the pinned buffers are freed on return: no copy may still read them

        threads = [threading.Thread(target=reader, name=f"lft-read-{i}") for i in range(READ_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    finally:
        for fd in handles:
            os.close(fd)
    torch.cuda.synchronize(device)
    state = {}
    while tensors:  # popped, so a tensor cast to another dtype frees its stored bytes at once
        name, raw, stored, shape = tensors.pop(0)
        t = raw.view(stored).view(shape)
        del raw
        state[name] = t if stored == dtype else t.to(dtype)
    return state


def new_backbone(config: dict, dtype=torch.bfloat16, attn_implementation: str = "sdpa", device="cpu",
                 std: float = 0.02) -> Qwen3Decoder:
    """A randomly initialised decoder of a config (benches): normal(0, std) projections and embeddings, unit norms."""
    if attn_implementation == VARLEN:
        resolve_varlen()
    with torch.device(device):
        decoder = Qwen3Decoder(Qwen3Config(config, attn_implementation))
        for name, p in decoder.named_parameters():
            with torch.no_grad():
                p.normal_(0, std) if p.ndim > 1 else p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        decoder.inv_freq = decoder._inv_freq(torch.device(device))
    return decoder.to(dtype).eval()


def add_lora(model: Qwen3Classifier, r: int = 8, alpha: float = 16, dropout: float = 0.1,
             targets=LORA_TARGETS, rslora: bool = False) -> Qwen3Classifier:
    """Put LoRA layers (LoraLinear) in place of the target projections of every decoder layer. Base weights
    freeze; the adapters are float32 even when the base is bf16/fp16 (peft's autocast_adapter_dtype); the head
    stays trainable."""
    targets = list(targets)
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if not targets or unknown:
        raise UserError(f"--lora_target_modules: {', '.join(unknown) or '(none given)'} is not a module of the "
                        f"model; choose from {', '.join(ALL_TARGETS)}")
    if lora_layers(model.backbone):
        raise ValueError("the model already has LoRA layers")
    model.backbone.requires_grad_(False)
    _put_lora(model.backbone, r, alpha, dropout, targets, rslora)
    model.score.weight.requires_grad_(True)
    return model


def _put_lora(root: nn.Module, r: int, alpha: float, dropout: float, targets, rslora: bool = False) -> None:
    for name, module in list(root.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and type(module) is nn.Linear:
            parent, child = _parent(root, name)
            setattr(parent, child, LoraLinear(module, r, alpha, dropout, rslora))


def build_classifier(checkpoint, labels=DEFAULT_LABELS, dropout=0.1, pooling="last", dtype=torch.float32,
                     attn_implementation="sdpa", lora: dict | None = None, device="cpu", with_tokenizer=False):
    """(model on `device`, base identity) for training: base from `checkpoint`, a fresh head, LoRA if asked.
    The identity (lft.base) reads every weight, so it is taken where the model will run. `with_tokenizer`:
    (model, identity, tokenizer), the tokenizer loaded while the weights move (tokenizer_meanwhile)."""
    checkpoint = base.check_folder(checkpoint)
    with tokenizer_meanwhile(checkpoint) if with_tokenizer else contextlib.nullcontext() as tokenizer:
        backbone = load_backbone(checkpoint, dtype, attn_implementation, device=device)
        identity = base.identity(checkpoint, backbone)
    model = Qwen3Classifier(backbone, len(labels), dropout, pooling).to(device)
    if lora is not None:
        add_lora(model, **lora)
    return (model, identity, tokenizer.result()) if with_tokenizer else (model, identity)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
