"""The one model module: a Qwen3 sequence classifier with LoRA, its tokenizer, and how it is saved and loaded.

Every script builds, saves and loads the model only through this file.

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

Adapter folder (best_model/, checkpoint-*/):
  adapter_model.safetensors, adapter_config.json   LoRA weights and config (peft's format)
  head.safetensors                                 score.weight
  classifier_config.json                           labels, pooling, max_length, base-model identity,
                                                   the arguments that trained it and the metrics it was chosen by
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lft.common import UserError, atomic_dir, redact, write_json
from lft.labels import DEFAULT_LABELS

FORMAT = "lft-qwen3-classifier/1"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "head.safetensors", "classifier_config.json")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PAD_TOKEN = "<|endoftext|>"  # Qwen3 ships no pad token; this is the one Qwen's own configs use
# peft 0.21 still calls this transformers-5 deprecated alias on every wrap; it is noise to users
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
VARLEN = "lft_varlen"  # our attention implementation for packed rows on CUDA (see varlen_attention)


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


def choose_attention(requested: str, packing: bool, device) -> str:
    """'auto': varlen flash attention for packed rows on CUDA; sdpa otherwise (on CPU, packed rows get a
    block-diagonal mask that transformers derives from the restarting position ids)."""
    have_varlen = False
    if torch.device(device).type == "cuda":  # the import costs ~2 s (it loads dynamo): only where it can run
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
            have_varlen = True
        except ImportError:
            pass
    if requested == "varlen":
        if not (have_varlen and packing):
            raise UserError("--attn_implementation varlen needs CUDA, torch >= 2.10 and --packing on")
        return VARLEN
    if requested == "auto":
        return VARLEN if have_varlen and packing else "sdpa"
    return requested


def choose_precision(args, device: torch.device):
    """(weight dtype, autocast dtype or None, use GradScaler, reason). Qwen3 was trained in bf16, so bf16 is
    the GPU default; fp16 keeps trainable weights in fp32 and needs a GradScaler; the CPU default is fp32."""
    if args.fp16:
        return torch.float16, torch.float16, True, "fp16 (--fp16): autocast + GradScaler, fp32 LoRA/head"
    if args.bf16:
        return torch.bfloat16, torch.bfloat16, False, "bf16 (--bf16): bf16 base, fp32 LoRA/head"
    if device.type == "cuda" and not args.fp32 and torch.cuda.is_bf16_supported():
        return torch.bfloat16, torch.bfloat16, False, "bf16 (default on a GPU; Qwen3 was trained in bf16)"
    why = "--fp32" if args.fp32 else "default on CPU"
    return torch.float32, None, False, f"fp32 ({why})"


def on_for_cuda(flag: str, device) -> bool:
    """An auto|on|off flag (--packing, --compile): 'auto' means on for CUDA."""
    return flag == "on" or (flag == "auto" and torch.device(device).type == "cuda")


def use_cuda_graphs(flag: str, device, packing: bool, attn: str) -> bool:
    """--cuda_graphs auto|on|off. Graphs replay fixed-shape packed rows (lft/cuda_graphs.py), so they need CUDA,
    packing and the varlen attention; 'auto' uses them wherever they apply."""
    possible = torch.device(device).type == "cuda" and packing and attn == VARLEN
    if flag == "on" and not possible:
        raise UserError("--cuda_graphs on needs a CUDA device, --packing on and varlen attention")
    return possible and flag != "off"


def autocast(device, amp_dtype):
    """Autocast to `amp_dtype` on `device` (off when None), for every forward of the toolkit. Its cache of cast
    weights is off: a CUDA graph must not keep cached casts, and each weight is cast once per forward anyway."""
    return torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                          cache_enabled=False)


def compile_decoder_layers(model: "Qwen3Classifier") -> None:
    """torch.compile each decoder layer (dynamic shapes: packed rows vary in length). Fuses the RMSNorms,
    rotary embedding, SiLU gate and LoRA dropout/scale/add into a few kernels: on an H200 this doubled
    training and evaluation throughput at the default settings (bench/RESULTS.md)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in model.base_model.layers:
        layer.compile(dynamic=True)


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

def check_checkpoint(path) -> Path:
    """Fail early, with one line, if `path` is not a complete local Qwen3 folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--checkpoint {path}: not a folder (give the local folder of a Qwen3 model)")
    if not (path / "config.json").is_file():
        raise UserError(f"--checkpoint {path}: no config.json; is this a Hugging Face model folder?")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "qwen3":
        raise UserError(f"--checkpoint {path}: model_type is {config.get('model_type')!r}, expected 'qwen3'")
    weights = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        needed = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(n for n in needed if not (path / n).is_file())
        if missing:
            raise UserError(f"--checkpoint {path}: incomplete download, missing {', '.join(missing)}")
    elif not weights:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        why = f" (found pickle files {', '.join(pickled)}; only safetensors are loaded)" if pickled else ""
        raise UserError(f"--checkpoint {path}: no *.safetensors weights{why}")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise UserError(f"--checkpoint {path}: no tokenizer files (tokenizer.json)")
    for f in weights:
        if problem := safetensors_problem(f):
            raise UserError(f"--checkpoint {path}: {problem}; download the model again")
    return path


def safetensors_problem(path: Path) -> str | None:
    """None if `path` is a whole safetensors file (its header parses and its size is exactly what the header
    describes), else what is wrong: catches a download cut short before loading gigabytes."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"{path.name} is truncated ({size} bytes)"
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        expected = 8 + n + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is not a safetensors file (damaged header)"
    if size != expected:
        return f"{path.name} has {size} bytes, its header describes {expected} (incomplete download?)"
    return None




def load_tokenizer(checkpoint):
    """The checkpoint's own tokenizer, offline, with the pad token set explicitly."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = PAD_TOKEN
    return tok


def load_backbone(checkpoint, dtype=torch.float32, attn_implementation: str = "sdpa"):
    from transformers import Qwen3Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a local load says nothing useful
    if attn_implementation == VARLEN:
        register_varlen_attention()

    return Qwen3Model.from_pretrained(str(checkpoint), dtype=dtype, attn_implementation=attn_implementation,
                                      local_files_only=True, trust_remote_code=False, use_safetensors=True)


def base_identity(checkpoint, backbone) -> dict:
    """What an adapter records about its base: architecture fields, and a checksum of a few weights that
    tells two checkpoints of the same shape apart (tolerant to the dtype they were loaded in)."""
    cfg = backbone.config
    arch = {k: getattr(cfg, k) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size")}
    with torch.no_grad():
        # a fixed sample of embedding rows and of the last layer's MLP, projected on a fixed +-1 pattern: two
        # random inits differ by ~the norm, while bf16-vs-fp32 rounding moves it by ~0.4% of the norm
        emb = backbone.get_input_embeddings().weight
        down = backbone.layers[-1].mlp.down_proj.weight
        sample = torch.cat([emb[torch.linspace(0, emb.shape[0] - 1, 256).long()].flatten(),
                            down[torch.linspace(0, down.shape[0] - 1, 16).long()].flatten()]).double().cpu()
        signs = torch.randint(0, 2, sample.shape, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
        checksum = {"signed_sum": float(sample @ signs), "norm": float(sample.norm())}
    return {"path": redact(str(checkpoint)), "name": Path(str(checkpoint)).name, "architecture": arch,
            "architecture_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16],
            "weights_checksum": checksum}


def check_base(recorded: dict, actual: dict, adapter) -> None:
    if recorded["architecture"] != actual["architecture"]:
        diff = {k: (recorded["architecture"].get(k), v) for k, v in actual["architecture"].items()
                if recorded["architecture"].get(k) != v}
        raise UserError(f"{adapter}: trained on a different base model ({recorded['name']}); "
                        f"architecture differs (adapter vs --checkpoint): {diff}")
    a, b = recorded["weights_checksum"], actual["weights_checksum"]
    if abs(a["signed_sum"] - b["signed_sum"]) > 0.03 * a["norm"] or abs(a["norm"] - b["norm"]) > 0.01 * a["norm"]:
        raise UserError(f"{adapter}: trained on base {recorded['name']} whose weights differ from --checkpoint "
                        f"{actual['path']} (checksum {a['signed_sum']:.4f} vs {b['signed_sum']:.4f}); "
                        "pass the base it was trained on")


def add_lora(model: Qwen3Classifier, r: int = 8, alpha: int = 16, dropout: float = 0.1,
             targets=LORA_TARGETS) -> Qwen3Classifier:
    """Wrap the backbone with peft LoRA adapters. Base weights freeze; adapters are kept in float32 even
    when the base is bf16/fp16 (peft's autocast_adapter_dtype); the head stays trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    model.backbone = get_peft_model(model.backbone, config, autocast_adapter_dtype=True)
    model.score.weight.requires_grad_(True)
    return model


def build_classifier(checkpoint, labels=DEFAULT_LABELS, dropout=0.1, pooling="last", dtype=torch.float32,
                     attn_implementation="sdpa", lora: dict | None = None):
    """(model, base identity) for training: base from `checkpoint`, a fresh head, LoRA if asked."""
    checkpoint = check_checkpoint(checkpoint)
    backbone = load_backbone(checkpoint, dtype, attn_implementation)
    identity = base_identity(checkpoint, backbone)
    model = Qwen3Classifier(backbone, len(labels), dropout, pooling)
    if lora is not None:
        add_lora(model, **lora)
    return model, identity


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# --- saving and loading, side by side ----------------------------------------------------------------------

def save_adapter(model: Qwen3Classifier, folder, meta: dict) -> None:
    """Write an adapter folder atomically (see module docstring). `meta` must hold labels, base, args."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_model = model.backbone
    with atomic_dir(folder) as tmp:
        state = {k: v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in get_peft_model_state_dict(peft_model).items()}
        save_file(state, str(tmp / "adapter_model.safetensors"))
        peft_model.peft_config["default"].save_pretrained(str(tmp))
        save_file({"score.weight": model.score.weight.detach().to("cpu", torch.float32).contiguous()},
                  str(tmp / "head.safetensors"))
        write_json(tmp / "classifier_config.json", {"format": FORMAT, "pooling": model.pooling,
                                                    "dropout": model.dropout.p, **meta})


def read_classifier_config(folder) -> dict:
    folder = Path(folder)
    path = folder / "classifier_config.json"
    if not path.is_file():
        raise UserError(f"{folder}: not an adapter or merged folder from this toolkit (no classifier_config.json)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def is_merged(folder) -> bool:
    return (Path(folder) / "config.json").is_file() and not (Path(folder) / "adapter_config.json").is_file()


def load_classifier(checkpoint, folder, dtype=torch.float32, attn_implementation="sdpa"):
    """(model, tokenizer, meta) from an adapter folder on top of `checkpoint`, or from a merged folder
    (then `checkpoint` may be None). Refuses an adapter whose recorded base differs from `checkpoint`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--lora_model {folder}: not a folder")
    meta = read_classifier_config(folder)
    merged = is_merged(folder)
    if merged:
        checkpoint = check_checkpoint(folder)
        backbone = load_backbone(folder, dtype, attn_implementation)
    else:
        missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
        if missing:
            raise UserError(f"--lora_model {folder}: incomplete adapter, missing {', '.join(missing)}")
        if checkpoint is None:
            raise UserError(f"--lora_model {folder} is an adapter: --checkpoint (its base model) is required")
        checkpoint = check_checkpoint(checkpoint)
        backbone = load_backbone(checkpoint, dtype, attn_implementation)
        check_base(meta["base"], base_identity(checkpoint, backbone), folder)
    tokenizer = load_tokenizer(checkpoint)
    model = Qwen3Classifier(backbone, len(meta["labels"]), meta.get("dropout", 0.0), meta["pooling"])
    if merged:
        model.score.weight.data.copy_(_merged_head(folder)["score.weight"].to(torch.float32))
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig.from_pretrained(str(folder))
        model.backbone = get_peft_model(model.backbone, config, autocast_adapter_dtype=True)
        load_adapter_weights(model, folder)
    return model.eval(), tokenizer, meta


def load_adapter_weights(model: Qwen3Classifier, folder) -> None:
    """An adapter folder's LoRA and head weights into a model that already has its LoRA layout (a fresh
    load above, or a run resuming from checkpoint-<step>/)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    result = set_peft_model_state_dict(model.backbone, load_file(str(folder / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{folder}/adapter_model.safetensors: unexpected tensors {result.unexpected_keys[:3]}")
    model.score.weight.data.copy_(load_file(str(folder / "head.safetensors"))["score.weight"].to(torch.float32))


def _merged_head(folder: Path) -> dict:
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            if "score.weight" in st.keys():
                return {"score.weight": st.get_tensor("score.weight")}
    raise UserError(f"{folder}: merged model has no score.weight")


def export_merged(model: Qwen3Classifier, tokenizer, folder, meta: dict, dtype=torch.bfloat16) -> None:
    """Fold LoRA into the base weights and save a plain transformers `Qwen3ForSequenceClassification` folder
    (config with id2label/label2id and pad_token_id) plus our classifier_config.json."""
    import copy

    from transformers import Qwen3ForSequenceClassification

    if model.pooling != "last":
        raise UserError("--merge: transformers' Qwen3ForSequenceClassification pools the last token; "
                        "an adapter trained with --pooling mean cannot be exported that way")
    backbone = copy.deepcopy(model.backbone).to("cpu", torch.float32)
    if hasattr(backbone, "merge_and_unload"):
        backbone = backbone.merge_and_unload()
    config = copy.deepcopy(backbone.config)
    labels = meta["labels"]
    config.architectures = ["Qwen3ForSequenceClassification"]
    config.num_labels = len(labels)
    config.id2label = {i: n for i, n in enumerate(labels)}
    config.label2id = {n: i for i, n in enumerate(labels)}
    config.pad_token_id = tokenizer.pad_token_id
    config.tie_word_embeddings = False
    hf = Qwen3ForSequenceClassification(config)
    hf.model.load_state_dict(backbone.state_dict())
    hf.score.weight.data.copy_(model.score.weight.detach().float())
    hf = hf.to(dtype)
    with atomic_dir(folder) as tmp:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "classifier_config.json", {**meta, "format": FORMAT, "pooling": "last", "dropout": 0.0,
                                                    "merged": True, "merged_dtype": str(dtype).split(".")[-1]})


# --- inference ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def predict_probs(model: Qwen3Classifier, input_ids: list[list[int]], batches: list[list[int]], device,
                  pad_id: int, packing: bool = False, amp_dtype=None, graphs: bool = False,
                  max_len: int | None = None) -> dict[int, torch.Tensor]:
    """Class probabilities for the samples in `batches` (lists of indices into input_ids), on the CPU.
    graphs: replay CUDA graphs of fixed-shape packed rows (see use_cuda_graphs); max_len bounds every text
    (default: the longest given)."""
    from lft.data import collate_packed, collate_packed_static, collate_padded, static_shape, to_device

    was_training = model.training
    model.eval()
    runner = _eval_graphs(model, device, amp_dtype) if graphs else None
    max_len = max_len or max((len(input_ids[i]) for b in batches for i in b), default=1)
    order, chunks = [], []
    for batch in batches:
        seqs = [input_ids[i] for i in batch]
        if runner is not None:
            # widths in steps of 512: rows made by eval_batches(packed=True) nearly all share one width
            width, slots = static_shape(len(seqs), sum(map(len, seqs)), max_len, step=512)
            chunks.append(runner(collate_packed_static(seqs, width, slots, max_len, pad_id))[:len(seqs)].clone())
        else:
            enc = to_device(collate_packed(seqs) if packing else collate_padded(seqs, pad_id), device)
            with autocast(device, amp_dtype):
                chunks.append(F.softmax(model(**enc), dim=-1))  # stays on the device: one transfer at the end
        order.extend(batch)
    model.train(was_training)
    probs = torch.cat(chunks).cpu() if chunks else torch.empty(0)
    return dict(zip(order, probs))


def _eval_graphs(model: Qwen3Classifier, device, amp_dtype):
    """The model's evaluation graphs (one per row shape), made on first use and kept with the model."""
    from lft.cuda_graphs import RowGraphs

    if getattr(model, "_eval_graphs", None) is None:
        def forward(s):
            with autocast(device, amp_dtype):
                return F.softmax(model(s["input_ids"], position_ids=s["position_ids"], cu_seqlens=s["cu_seqlens"],
                                       max_len=s["max_len"]), dim=-1)
        model._eval_graphs = RowGraphs(forward, device)
    return model._eval_graphs
