"""The adapter on disk: save, load and verify an adapter folder; the merged export. Save and load side by side.

Adapter folder (best_model/, and the weights part of checkpoint-*/):
  adapter_model.safetensors, adapter_config.json   LoRA weights and config (peft's format: peft loads them onto
                                                   transformers' Qwen3Model; tests/test_model.py checks it)
  head.safetensors                                 score.weight
  classifier_config.json                           labels, pooling, max_length, base-model identity,
                                                   the arguments that trained it and the metrics it was chosen by
Merged folder (best_model_merged/): a plain transformers Qwen3ForSequenceClassification (config with
id2label/label2id and pad_token_id, safetensors, tokenizer) plus the same classifier_config.json.

Loading checks what it can: the format tag, every file present, every LoRA tensor the config implies present
with its shape, nothing extra, all values finite, lora_alpha/r as recorded, and the base's identity.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import qwen3_classification_direct as qcd

from . import base
from .common import UserError, atomic_dir, read_json_object, write_json

FORMAT = "lft-qwen3-classifier/1"
WEIGHT_FILES = ("adapter_model.safetensors", "head.safetensors")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "head.safetensors", "classifier_config.json")


PEFT_PREFIX = "base_model.model."  # where peft's saved names put a LoRA layer of the wrapped model
PEFT_VERSION = "0.21.2"  # the peft whose adapter_config.json fields we write (and whose loader the tests use)


def adapter_state(model: qcd.Qwen3Classifier) -> dict[str, torch.Tensor]:
    """The LoRA tensors under peft's saved names: base_model.model.<layer>.lora_A.weight (no adapter name)."""
    state = {}
    for name, layer in qcd.lora_layers(model.backbone):
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A["default"].weight
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B["default"].weight
    return state


def lora_config(model: qcd.Qwen3Classifier) -> dict:
    """adapter_config.json as peft 0.21 writes it for our LoRA (every field; defaults where we use none)."""
    layers = qcd.lora_layers(model.backbone)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = layers[0][1]
    dropout = first.lora_dropout["default"]
    rslora = not math.isclose(first.scaling, first.alpha / first.r)
    return {"task_type": None, "peft_type": "LORA", "auto_mapping": None, "peft_version": PEFT_VERSION,
            "base_model_name_or_path": None, "revision": None, "inference_mode": True, "r": first.r,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n, _ in layers}),
            "exclude_modules": None, "lora_alpha": first.alpha,
            "lora_dropout": dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0,
            "fan_in_fan_out": False, "bias": "none", "use_rslora": rslora, "modules_to_save": None,
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
            "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
            "use_dora": False, "layer_replication": None, "lora_bias": False, "target_parameters": None}


def save_adapter(model: qcd.Qwen3Classifier, folder, meta: dict) -> None:
    """Write an adapter folder atomically. `meta` must hold labels, base, args. A non-finite weight is
    refused: a NaN adapter must never be kept as a model."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state(model).items()}
    head = {"score.weight": model.score.weight.detach().to("cpu", torch.float32).contiguous()}
    bad = [k for k, v in {**state, **head}.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"refusing to save {Path(folder).name}: non-finite values in {', '.join(bad[:3])}; "
                        "lower --learning_rate")
    with atomic_dir(folder) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"))
        write_json(tmp / "adapter_config.json", lora_config(model))
        save_file(head, str(tmp / "head.safetensors"))
        write_json(tmp / "classifier_config.json", {"format": FORMAT, "pooling": model.pooling,
                                                    "dropout": model.dropout.p, **meta})


def read_classifier_config(folder, flag: str = "--lora_model") -> dict:
    folder = Path(folder)
    path = folder / "classifier_config.json"
    if not path.is_file():
        raise UserError(f"{flag} {folder}: not an adapter or merged folder from this toolkit "
                        "(no classifier_config.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({str(e)[:100]}); the adapter is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{path}: unknown format {got!r} (expected {FORMAT})")
    labels = meta.get("labels")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) and x for x in labels)
            and meta.get("pooling") in ("last", "mean") and isinstance(meta.get("max_length"), int)):
        raise UserError(f"{path}: labels, pooling or max_length missing or malformed; the adapter is damaged")
    return meta


def is_merged(folder) -> bool:
    return (Path(folder) / "config.json").is_file() and not (Path(folder) / "adapter_config.json").is_file()


def load_classifier(checkpoint, folder, dtype=torch.float32, attn_implementation="sdpa", device="cpu"):
    """(model on `device`, tokenizer, meta) from an adapter folder on top of `checkpoint` (None: the base path
    the adapter recorded), or from a merged folder. Refuses an adapter whose recorded base differs from the base
    loaded, and non-finite weights anywhere."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--lora_model {folder}: not a folder")
    meta = read_classifier_config(folder)
    if is_merged(folder):
        checkpoint = base.check_folder(folder, flag="--lora_model")
        with qcd.tokenizer_meanwhile(checkpoint) as tokenizer:
            backbone = qcd.load_backbone(folder, dtype, attn_implementation, prefix="model.", device=device)
            base.tensor_checksums(backbone, folder, flag="--lora_model")  # refuses NaN/inf weights
        head = _merged_head(folder)
    else:
        missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
        if missing:
            raise UserError(f"--lora_model {folder}: incomplete adapter, missing {', '.join(missing)}")
        if checkpoint is None:
            recorded = meta.get("base", {}).get("path")
            if not recorded or "***" in recorded or not Path(recorded).is_dir():
                raise UserError(f"--lora_model {folder} is an adapter and the base it recorded ({recorded}) is "
                                "not here: pass --checkpoint (its base model)")
            checkpoint = recorded
        checkpoint = base.check_folder(checkpoint)
        with qcd.tokenizer_meanwhile(checkpoint) as tokenizer:
            backbone = qcd.load_backbone(checkpoint, dtype, attn_implementation, device=device)
            base.check_same_base(meta["base"], base.identity(checkpoint, backbone), folder)
        head = None
    tokenizer = tokenizer.result()
    model = qcd.Qwen3Classifier(backbone, len(meta["labels"]), meta.get("dropout", 0.0), meta["pooling"]).to(device)
    if head is not None:
        _copy_head(model, head, folder / "model.safetensors")
    else:
        qcd.add_lora(model, **read_lora_config(folder, meta))
        load_adapter_weights(model, folder)
    return model.eval(), tokenizer, meta


# adapter_config.json fields whose other values would make peft compute something this toolkit does not
UNSUPPORTED = {"peft_type": "LORA", "fan_in_fan_out": False, "bias": "none", "use_dora": False, "lora_bias": False,
               "modules_to_save": None, "layers_to_transform": None, "layer_replication": None,
               "exclude_modules": None, "target_parameters": None, "rank_pattern": {}, "alpha_pattern": {},
               "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None,
               "megatron_config": None, "velora_config": None, "monteclora_config": None, "use_bdlora": None,
               "arrow_config": None, "kasa_config": None}


def read_lora_config(folder: Path, meta: dict) -> dict:
    """add_lora's arguments from an adapter folder's adapter_config.json (peft's format). Refuses what this
    toolkit does not compute (DoRA, per-layer ranks, biases, ...) and r/alpha changed since training."""
    path = folder / "adapter_config.json"
    config = read_json_object(path, "the adapter is damaged")
    odd = [f"{k} {config[k]!r}" for k, want in UNSUPPORTED.items()
           if k in config and config[k] != want and not (want in (None, {}) and config[k] in (None, {}, []))]
    if "peft_type" not in config:
        odd.append("no peft_type")
    if odd:
        raise UserError(f"{path}: {', '.join(odd)} is not supported (plain LoRA on q/k/v/o/gate/up/down only)")
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    dropout = config.get("lora_dropout", 0.0)
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise UserError(f"{path}: r must be a positive integer, not {r!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise UserError(f"{path}: lora_alpha must be a positive number, not {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise UserError(f"{path}: lora_dropout must be in [0, 1), not {dropout!r}")
    if not (isinstance(targets, list) and targets and all(t in qcd.ALL_TARGETS for t in targets)):
        raise UserError(f"{path}: target_modules must be a list of {', '.join(qcd.ALL_TARGETS)}, not {targets!r}")
    args = meta.get("args") or {}
    recorded = {"r": args.get("lora_r"), "lora_alpha": args.get("lora_alpha")}
    changed = [f"{k} {config[k]} (trained with {v})" for k, v in recorded.items()
               if v is not None and config[k] != v]
    if changed:
        raise UserError(f"{path}: {', '.join(changed)}; the file was edited after training and the adapter would "
                        "compute something else")
    return {"r": r, "alpha": alpha, "dropout": float(dropout), "targets": targets,
            "rslora": bool(config.get("use_rslora", False))}


def load_adapter_weights(model: qcd.Qwen3Classifier, folder) -> None:
    """An adapter folder's LoRA and head weights into a model that already has its LoRA layout (a fresh load
    above, or a run resuming from checkpoint-<step>/). Every LoRA tensor of the layout must be in the file,
    with its shape, and nothing else; every value finite."""
    folder = Path(folder)
    state = _load_safetensors(folder / "adapter_model.safetensors")
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing {len(missing)} tensor(s), e.g. {missing[:2]}" if missing else f"unexpected {extra[:3]}"
        raise UserError(f"{folder}/adapter_model.safetensors: {what}; it does not belong to this LoRA config")
    shapes = [k for k, v in state.items() if v.shape != expected[k].shape]
    if shapes:
        k = shapes[0]
        raise UserError(f"{folder}/adapter_model.safetensors: {k} has shape {tuple(state[k].shape)}, the config "
                        f"implies {tuple(expected[k].shape)}")
    _check_finite(state, folder / "adapter_model.safetensors")
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v)
    _copy_head(model, _load_safetensors(folder / "head.safetensors"), folder / "head.safetensors")


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if problem := base.safetensors_problem(path):
        raise UserError(f"{path}: {problem}; the adapter is damaged")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for malformed headers/data
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0][:120]}); the adapter is damaged") from None


def _check_finite(state: dict, path: Path) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{path}: non-finite values in {', '.join(bad[:3])}; the model is unusable")


def _copy_head(model: qcd.Qwen3Classifier, state: dict, path: Path) -> None:
    w = state.get("score.weight")
    if w is None or w.shape != model.score.weight.shape:
        got = "none" if w is None else tuple(w.shape)
        raise UserError(f"{path}: score.weight has shape {got}, expected {tuple(model.score.weight.shape)} "
                        "(one row per label)")
    _check_finite({"score.weight": w}, path)
    model.score.weight.data.copy_(w.to(torch.float32))


def _merged_head(folder: Path) -> dict:
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            if "score.weight" in st.keys():
                return {"score.weight": st.get_tensor("score.weight")}
    raise UserError(f"--lora_model {folder}: merged model has no score.weight")


def fingerprint(folder) -> str:
    """16 hex digits naming a saved model: the sha256 of its classifier_config.json and weights (for a merged
    folder, the safetensors headers plus every 64th MiB, so naming a 4 GB model stays fast). Predictions record
    it, so a MongoDB write-back knows which documents this very model already labelled."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    files = [folder / "classifier_config.json"]
    files += [folder / f for f in WEIGHT_FILES] if not is_merged(folder) else sorted(folder.glob("*.safetensors"))
    for path in files:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            if path.suffix != ".safetensors" or not is_merged(folder):
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                continue
            size = path.stat().st_size
            for offset in range(0, size, 64 << 20):
                f.seek(offset)
                h.update(f.read(1 << 20))
            h.update(str(size).encode())
    return h.hexdigest()[:16]


def base_dtype(checkpoint) -> torch.dtype:
    """The dtype a base checkpoint's config declares (what --merge_dtype auto writes); float32 if none."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def export_merged(model: qcd.Qwen3Classifier, tokenizer, folder, meta: dict, dtype=torch.bfloat16) -> None:
    """Fold LoRA into the base weights and save a plain transformers `Qwen3ForSequenceClassification` folder
    (config with id2label/label2id and pad_token_id) plus our classifier_config.json. The fold is done in
    float32; `dtype` is what the files hold."""
    import copy

    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    if model.pooling != "last":
        raise UserError("--merge: transformers' Qwen3ForSequenceClassification pools the last token; an adapter "
                        "trained with --pooling mean cannot be exported that way (use predict.py with the adapter)")
    backbone = qcd.merge_lora(copy.deepcopy(model.backbone).to("cpu", torch.float32))
    config = Qwen3Config.from_dict({k: v for k, v in backbone.config.raw.items()
                                    if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")})
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
