"""The base model folder: is it a complete local Qwen3 checkpoint, and which one is it (identity).

`check_folder` runs before anything heavy is imported or loaded (it reads only JSON and safetensors headers).
`identity` is what an adapter records about the base it was trained on; `check_same_base` refuses to put an
adapter on any other base.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from .common import UserError, gc_paused, redact


def _json(path: Path, flag: str, folder: Path):
    try:
        with gc_paused():  # tokenizer.json: 6 MB of JSON
            return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {folder}: {path.name} is not valid JSON ({str(e).splitlines()[0][:120]}); "
                        "download the model again") from None


def check_folder(path, flag: str = "--checkpoint") -> Path:
    """Fail early, with one line naming `flag`, if `path` is not a complete local Qwen3 folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: not a folder (give the local folder of a Qwen3 model)")
    if not (path / "config.json").is_file():
        raise UserError(f"{flag} {path}: no config.json; is this a Hugging Face model folder?")
    config = _json(path / "config.json", flag, path)
    if not isinstance(config, dict):
        raise UserError(f"{flag} {path}: config.json holds a {type(config).__name__}, not an object")
    if config.get("model_type") != "qwen3":
        raise UserError(f"{flag} {path}: model_type is {config.get('model_type')!r}, expected 'qwen3'")
    weights = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json(index, flag, path)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{flag} {path}: model.safetensors.index.json has no valid weight_map")
        bad = sorted(v for v in set(weight_map.values()) if Path(v).name != v)
        if bad:
            raise UserError(f"{flag} {path}: model.safetensors.index.json names files outside the folder: {bad[:3]}")
        missing = sorted(n for n in set(weight_map.values()) if not (path / n).is_file())
        if missing:
            raise UserError(f"{flag} {path}: incomplete download, missing {', '.join(missing)}")
    elif not weights:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        why = f" (found pickle files {', '.join(pickled)}; only safetensors are loaded)" if pickled else ""
        raise UserError(f"{flag} {path}: no *.safetensors weights{why}")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise UserError(f"{flag} {path}: no tokenizer files (tokenizer.json)")
    if (path / "tokenizer.json").is_file():
        _json(path / "tokenizer.json", flag, path)
    for f in weights:
        if problem := safetensors_problem(f):
            raise UserError(f"{flag} {path}: {problem}; download the model again")
    check_tensors(path, config, weights, flag)
    return path


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Every decoder tensor a Qwen3 config implies, with its shape (names without the "model." prefix)."""
    h, inter, layers = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim, vocab = int(config.get("head_dim") or h // heads), int(config["vocab_size"])
    out = {"embed_tokens.weight": (vocab, h), "norm.weight": (h,)}
    for i in range(layers):
        pre = f"layers.{i}."
        out.update({pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
                    pre + "self_attn.q_proj.weight": (heads * head_dim, h),
                    pre + "self_attn.k_proj.weight": (kv * head_dim, h),
                    pre + "self_attn.v_proj.weight": (kv * head_dim, h),
                    pre + "self_attn.o_proj.weight": (h, heads * head_dim),
                    pre + "self_attn.q_norm.weight": (head_dim,), pre + "self_attn.k_norm.weight": (head_dim,),
                    pre + "mlp.gate_proj.weight": (inter, h), pre + "mlp.up_proj.weight": (inter, h),
                    pre + "mlp.down_proj.weight": (h, inter)})
    return out


def check_tensors(path: Path, config: dict, weights: list[Path], flag: str) -> None:
    """Every tensor the config implies is in the files with its shape (read from the headers only): a base
    missing a layer, or whose config claims more layers than its weights hold, would otherwise train on randomly
    initialised weights without a word."""
    found = {}
    for f in weights:
        header, _ = safetensors_header(f)
        for k, v in header.items():
            if k != "__metadata__":
                found[k.removeprefix("model.")] = tuple(v.get("shape", ()))
    try:
        want = expected_tensors(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"{flag} {path}: config.json has a missing or non-numeric {e}; is this a Qwen3 "
                        "config?") from None
    missing = [k for k in want if k not in found]
    if missing:
        raise UserError(f"{flag} {path}: {len(missing)} tensor(s) that config.json implies are not in the weights, "
                        f"e.g. {', '.join(missing[:3])}; the download is incomplete or config.json does not belong "
                        "to these weights")
    wrong = [f"{k} {found[k]} (config implies {want[k]})" for k in want if found[k] != want[k]]
    if wrong:
        raise UserError(f"{flag} {path}: tensor shapes do not match config.json: {'; '.join(wrong[:3])}")


def safetensors_header(path) -> tuple[dict, int]:
    """A safetensors file's header (JSON) and the file offset where its data begins. For a file that passed
    safetensors_problem."""
    with Path(path).open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_problem(path: Path) -> str | None:
    """None if `path` is a whole safetensors file (its header parses, every tensor's byte range lies in the data,
    fits its dtype and shape exactly and overlaps no other, and the file's size is exactly what the header
    describes), else what is wrong: catches a download cut short, or a damaged or hostile header, before loading
    gigabytes (the weights are read by these byte ranges: qwen3_classification_direct.read_to_gpu)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"{path.name} is truncated ({size} bytes)"
            header = json.loads(f.read(n))
        ranges = []
        for k, v in header.items():
            if k == "__metadata__":
                continue
            start, end = v["data_offsets"]
            count = math.prod(v["shape"])
            if not (all(type(x) is int for x in (start, end, *v["shape"])) and 0 <= start <= end
                    and min(v["shape"], default=0) >= 0 and end - start == count * DTYPE_BYTES[v["dtype"]]):
                return f"{path.name}: the header's entry for {k[:80]} does not describe its bytes"
            ranges.append((start, end))
        ranges.sort()
        if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
            return f"{path.name}: the header describes overlapping tensors"
        expected = 8 + n + max((e for _, e in ranges), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path.name} is not a safetensors file (damaged header)"
    if size != expected:
        return f"{path.name} has {size} bytes, its header describes {expected} (incomplete download?)"
    return None


ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size")


def identity(checkpoint, backbone) -> dict:
    """What an adapter records about its base: architecture fields, a checksum of a few weights (what adapters
    written before 2026-11-29 hold), and two projections of EVERY tensor (`tensor_checksums`): two bases of the
    same shape, even one with a single re-randomised layer, differ by ~the norm, while the dtype a base is
    loaded in moves them by ~0.4% of it. Computed where the model is (a GPU takes it in milliseconds).
    A non-finite weight anywhere is refused here: such a base gives NaN probabilities."""
    cfg = backbone.config
    arch = {k: getattr(cfg, k) for k in ARCH_FIELDS}
    tensors = tensor_checksums(backbone, checkpoint)
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
            "weights_checksum": checksum, "tensor_checksums": tensors}


CHECKSUM_CHUNK = 1 << 24  # elements per float64 chunk: the values recorded in adapters depend on it, never change it


def tensor_checksums(backbone, checkpoint, flag: str = "--checkpoint") -> dict[str, list[float]]:
    """{name: [alternating-sign sum, norm]} of every parameter, accumulated in float64 in chunks (no full
    float64 copy of a 300M-element embedding). Names are those of the plain Qwen3Model, with or without LoRA.
    A NaN/inf weight is refused, naming `flag` (the folder's flag: --checkpoint, or --lora_model if merged).

    The values adapters record come from exactly these operations (same chunks, same reductions, so the same
    bits); what is fast about it: each chunk is converted into one reused float64 buffer and squared in place
    (a fresh 128 MB tensor per chunk made the CPU fault in new pages for every one), and the results stay on
    the model's device until one transfer at the end (no synchronisation per parameter on a GPU)."""
    named = [(n, p) for n, p in backbone.named_parameters() if "lora_" not in n]
    buffers = {}
    for _, p in named:  # one buffer per device, as large as the largest chunk there
        buffers[p.device] = max(buffers.get(p.device, 0), min(p.numel(), CHECKSUM_CHUNK))
    buffers = {d: torch.empty(n, dtype=torch.float64, device=d) for d, n in buffers.items()}
    rows = []
    with torch.no_grad():
        for _, p in named:
            flat, buf = p.detach().reshape(-1), buffers[p.device]
            alt, sq = torch.zeros((), dtype=torch.float64, device=flat.device), torch.zeros(
                (), dtype=torch.float64, device=flat.device)
            for start in range(0, flat.numel(), CHECKSUM_CHUNK):
                part = flat[start:start + CHECKSUM_CHUNK]
                chunk = buf[:part.numel()].copy_(part)  # == part.double(): exact for every float dtype
                sign = 1.0 if start % 2 == 0 else -1.0  # chunks start at even offsets: the pattern continues
                alt += sign * (chunk[0::2].sum() - chunk[1::2].sum())
                sq += chunk.mul_(chunk).sum()  # == (chunk * chunk).sum(), without a second 128 MB tensor
            rows.append(torch.stack([alt, sq.sqrt()]).to(named[0][1].device))
    values = torch.stack(rows).tolist() if rows else []  # the one transfer (and wait) for all parameters
    out = {}
    for (full_name, _), (a, n) in zip(named, values):
        name = full_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if not (math.isfinite(a) and math.isfinite(n)):
            raise UserError(f"{flag} {redact(str(checkpoint))}: weight {name} holds NaN or inf values; the "
                            "model is damaged: download or export it again")
        out[name] = [a, n]
    return out


def check_same_base(recorded: dict, actual: dict, adapter) -> None:
    """Refuse an adapter (or checkpoint) recorded on another base than the one loaded."""
    if recorded["architecture"] != actual["architecture"]:
        diff = {k: (recorded["architecture"].get(k), v) for k, v in actual["architecture"].items()
                if recorded["architecture"].get(k) != v}
        raise UserError(f"{adapter}: trained on a different base model ({recorded['name']}); "
                        f"architecture differs (adapter vs --checkpoint): {diff}")
    a, b = recorded["weights_checksum"], actual["weights_checksum"]
    differ = []
    if abs(a["signed_sum"] - b["signed_sum"]) > 0.03 * a["norm"] or abs(a["norm"] - b["norm"]) > 0.01 * a["norm"]:
        differ.append(f"sampled checksum {a['signed_sum']:.4f} vs {b['signed_sum']:.4f}")
    theirs = recorded.get("tensor_checksums") or {}
    for name, (alt, norm) in theirs.items():  # adapters written before 2026-11-29 have none: sampled only
        got = actual["tensor_checksums"].get(name)
        if got is None or abs(alt - got[0]) > 0.03 * norm + 1e-6 or abs(norm - got[1]) > 0.01 * norm + 1e-6:
            differ.append(name)
    if differ:
        raise UserError(f"{adapter}: trained on base {recorded['name']} whose weights differ from --checkpoint "
                        f"{actual['path']} ({len(differ)} differ, e.g. {', '.join(differ[:3])}); "
                        "pass the base it was trained on")
