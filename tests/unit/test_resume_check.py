"""The resume comparison's per-key decisions (retro/training/resume_check.py), without training."""

from __future__ import annotations

from retro.training.resume_check import compare, meaning


def record(**changes) -> dict:
    job = {
        "data": {"train": ["/d/a", "/d/b"], "weights": [], "seq_len": 16},
        "train": {"seed": 0, "global_batch": 8},
        "recurrence": {"curriculum": "1-sqrt", "max_mean": 3.0, "ramp_fraction": 0.5},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        job[section][name] = value
    return {"job": job, "model": {"shape": [1, 2, 1], "hidden_size": 64, "vocab_size": 97}}


def test_equal_mixtures_and_unchanged_settings_compare_equal():
    assert compare(meaning(record()), meaning(record(data__weights=[2.0, 2.0])), "ckpt") == ([], [])


def test_refused_and_noted_keys():
    refusals, notes = compare(meaning(record()), meaning(record(train__seed=1, recurrence__max_mean=4.0)), "ckpt")
    assert len(refusals) == 1 and refusals[0].startswith("train.seed changed from 0 (ckpt) to 1 (")
    assert len(notes) == 1 and notes[0].startswith("note: resume: recurrence.max_mean changed from 3 (ckpt) to 4;")
    refusals, _ = compare(meaning(record()), meaning(record(data__train=["/d/a"])), "ckpt")
    assert refusals[0].startswith('data.train changed from ["/d/a", "/d/b"] (ckpt) to ["/d/a"]')


def test_an_old_record_compares_only_what_it_has():
    old = {"job": {"recurrence": {"max_mean": 2.5}}, "model": None}
    assert compare(meaning(old), meaning(record(data__seq_len=32)), "ckpt")[0] == []


def lora_record(**lora) -> dict:
    out = record(train__trainable="lora")
    out["job"]["lora"] = {"rank": 16, "alpha": 32.0, "targets": ["q_proj", "o_proj"], "train_adapter": True, **lora}
    return out


def test_a_change_of_what_trains_is_refused():
    refusals, _ = compare(meaning(record(train__trainable="adapter")), meaning(record()), "ckpt")
    assert refusals[0].startswith('train.trainable changed from "adapter" (ckpt) to "all" (')
    # a record from before the key trained everything: resuming it as LoRA is refused, as "all" is not
    old = record()
    assert compare(meaning(old), meaning(lora_record()), "ckpt")[0][0].startswith("train.trainable changed from")
    assert compare(meaning(old), meaning(record(train__trainable="all")), "ckpt") == ([], [])


def test_lora_settings_are_compared_when_both_runs_train_lora():
    same = meaning(lora_record(targets=["o_proj", "q_proj"]))  # the same set in another order
    assert compare(meaning(lora_record()), same, "ckpt") == ([], [])
    for key, value in (("rank", 8), ("alpha", 16.0), ("targets", ["q_proj"]), ("train_adapter", False)):
        refusals, _ = compare(meaning(lora_record()), meaning(lora_record(**{key: value})), "ckpt")
        assert len(refusals) == 1 and refusals[0].startswith(f"lora.{key} changed from"), (key, refusals)
    # without LoRA the [lora] section means nothing and is not compared
    plain = record(train__trainable="recurrent")
    other = record(train__trainable="recurrent")
    other["job"]["lora"] = {"rank": 4}
    assert compare(meaning(plain), meaning(other), "ckpt") == ([], [])
