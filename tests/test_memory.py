"""The memory plan (lft/memory.py): from one measured forward/backward, the widest training row that fits the
budget; and the split of rows over that cap (lft/data.split_rows), which keeps every text and the order."""
import pytest

from lft import data as D
from lft import memory as M

GIB = 2 ** 30
# numbers of the shape of the H200 measurement: Qwen3-1.7B in bf16 (3.5 GiB with LoRA), 4,608-token probe row
# peaking at 14.2 GiB allocated
PROBE = M.Probe(tokens=4608, before=int(3.5 * GIB), peak=int(14.2 * GIB))


def test_a_card_with_room_keeps_the_wanted_rows():
    plan = M.plan_rows(PROBE, int(139 * GIB), want=4608, max_length=256, eval_tokens=9216)
    assert plan.row_tokens == 4608 and plan.note is None
    assert plan.need == pytest.approx(14.2 * GIB, rel=1e-6)


def test_a_smaller_card_caps_rows_at_a_multiple_of_128_that_fits():
    budget = int(14 * GIB)  # a 16 GB card
    plan = M.plan_rows(PROBE, budget, want=4608, max_length=256, eval_tokens=9216)
    assert plan.row_tokens % 128 == 0 and 256 <= plan.row_tokens < 4608
    assert plan.need <= budget * (1 - M.HEADROOM)  # fits, with the headroom left
    assert M.need(PROBE, plan.row_tokens + 128, 9216) > budget * (1 - M.HEADROOM)  # the next width would not
    assert "capped at" in plan.note and f"{plan.row_tokens:,}" in plan.note


def test_the_evaluation_rows_count_when_they_need_more_than_a_training_row():
    small_train = M.plan_rows(PROBE, int(12 * GIB), want=1024, max_length=256, eval_tokens=0)
    big_eval = M.plan_rows(PROBE, int(12 * GIB), want=1024, max_length=256, eval_tokens=8192)
    assert small_train.row_tokens == 1024 and big_eval.need > small_train.need


def test_too_small_for_one_text_is_an_error_naming_the_numbers():
    with pytest.raises(MemoryError, match=r"4\.0 GiB available.*--max_length 256"):
        M.plan_rows(PROBE, int(4 * GIB), want=4608, max_length=256, eval_tokens=9216)


def test_split_rows_keeps_every_text_in_order_and_never_cuts_one():
    lengths = [100, 200, 50, 300, 10, 256]
    rows = [[0, 1, 2], [3, 4, 5]]
    assert D.split_rows(rows, lengths, 10_000) == rows  # nothing over the cap: unchanged
    split = D.split_rows(rows, lengths, 300)
    assert split == [[0, 1], [2], [3], [4, 5]]
    assert [i for r in split for i in r] == [0, 1, 2, 3, 4, 5]
    assert all(sum(lengths[i] for i in r) <= 300 for r in split)
    assert D.split_rows([[0, 3]], lengths, 50) == [[0], [3]]  # a text longer than the cap stays whole, alone


def test_oom_summary_keeps_the_numbers_that_say_what_to_do():
    from lft.common import oom_summary

    msg = ("CUDA out of memory. Tried to allocate 54.00 MiB. GPU 0 has a total capacity of 139.80 GiB of which "
           "124.43 GiB is free. Process 938 has 610.00 MiB memory in use. Including non-PyTorch memory, this process "
           "has 13.97 GiB memory in use. Of the allocated memory 12.10 GiB is allocated by PyTorch, and 1.30 GiB is "
           "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting ...")
    assert oom_summary(msg) == ("tried to allocate 54.00 MiB, this process holds 13.97 GiB, 12.10 GiB allocated, "
                                "1.30 GiB reserved but free")
    assert oom_summary("something else\nsecond line") == "something else"
