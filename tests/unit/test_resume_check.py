"""The resume comparison's per-key decisions (retro/training/resume_check.py), without training."""

from __future__ import annotations

from retro.training.resume_check import compare, meaning


def record(**changes) -> dict:
    job = {
        "data": {"train": ["/d/a", "/d/b"], "weights": [], "seq_len": 16},
        "train": {"seed": 0, "global_batch": 8},
        "optim": {},
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


def test_the_draw_options_and_distillation_weights_are_noted_not_refused():
    changed = record(recurrence__draws_per_step=2, recurrence__fixed=True, recurrence__start_mean=2)
    refusals, notes = compare(meaning(record()), meaning(changed), "ckpt")
    assert refusals == []
    assert [note.split(" changed")[0] for note in notes] == [
        "note: resume: recurrence.start_mean",
        "note: resume: recurrence.draws_per_step",
        "note: resume: recurrence.fixed",
    ]
    assert "recurrence.fixed changed from false (ckpt) to true;" in notes[2]
    teacher = {"teacher": "/t", "kd_weight": 0.5, "temperature": 1.0}
    with_teacher = record()
    with_teacher["job"]["distill"] = teacher
    other = record()
    other["job"]["distill"] = {**teacher, "kd_weight": 0.2, "temperature": 2.0}
    refusals, notes = compare(meaning(with_teacher), meaning(other), "ckpt")
    assert refusals == [] and [n.split(" changed")[0] for n in notes] == [
        "note: resume: distill.kd_weight",
        "note: resume: distill.temperature",
    ]


def test_records_from_before_the_renames_compare_by_meaning():
    """sample_every = "step" was draws_per_step = 1, "micro_batch" 0; a teacher run's alpha was its kd_weight;
    without a teacher the weights are not compared; a record without the new keys ran at their defaults."""
    old = record(recurrence__sample_every="step")
    assert compare(meaning(old), meaning(record(recurrence__draws_per_step=1)), "ckpt") == ([], [])
    _, notes = compare(meaning(old), meaning(record(recurrence__draws_per_step=0)), "ckpt")
    assert len(notes) == 1 and "recurrence.draws_per_step changed from 1 (ckpt) to 0" in notes[0]
    assert compare(meaning(record()), meaning(record(recurrence__fixed=False, recurrence__start_mean=1)), "ckpt") == (
        [],
        [],
    )
    alpha, kd_weight, plain = record(), record(), record()
    alpha["job"]["distill"] = {"teacher": "/t", "alpha": 0.3, "temperature": 1.0}
    kd_weight["job"]["distill"] = {"teacher": "/t", "kd_weight": 0.3, "temperature": 1.0}
    plain["job"]["distill"] = {"teacher": "", "kd_weight": 0.9, "temperature": 1.0}
    assert compare(meaning(alpha), meaning(kd_weight), "ckpt") == ([], [])
    assert compare(meaning(plain), meaning(record()), "ckpt") == ([], [])


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


def test_the_optimizer_micro_batch_and_data_content_are_refused_the_length_noted():
    """optim.name used to end in DCP's `Missing key ... momentum_buffer` traceback; micro_batch in the data
    loader's refusal after config.json was rewritten; re-prepared shards resumed into other documents; a
    longer train.steps reshaped the curriculum's ramp without a word."""
    old = record(optim__name="adamw", train__micro_batch=2, train__steps=4)
    old["data_content"] = ["aaaa", "bbbb"]
    new = record(optim__name="muon", train__micro_batch=4, train__steps=8)
    new["data_content"] = ["aaaa", "cccc"]
    refusals, notes = compare(meaning(old), meaning(new), "ckpt")
    assert sorted(r.split(" changed")[0] for r in refusals) == ["data.content", "optim.name", "train.micro_batch"]
    assert [n.split(" changed")[0] for n in notes] == ["note: resume: train.steps"]
    assert "curriculum's ramp" in notes[0]


def test_data_content_follows_the_manifest(tmp_path):
    from retro.training.resume_check import data_content

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text('{"shards": [1]}')
    first = data_content([str(tmp_path / "a")])
    assert data_content([str(tmp_path / "a")]) == first
    (tmp_path / "a" / "manifest.json").write_text('{"shards": [2]}')  # re-prepared in place
    assert data_content([str(tmp_path / "a")]) != first
