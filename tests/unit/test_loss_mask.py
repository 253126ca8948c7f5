"""Chat data with the loss on the assistant's tokens only: the mask prepare stores, how it reaches the
labels (packing, resume, mixtures), the losses that use it, and the shard format's compatibility."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_helpers import (
    TURN_TEMPLATE,
    prepare_dir,
    random_chats,
    random_docs,
    turn_tokenizer,
    write_chats,
    write_jsonl,
)
from tiny import tiny_recurrent

from retro.data import inspect_shards
from retro.data.encode import spans_to_mask
from retro.data.loader import build_train_loader, build_val_batches
from retro.data.manifest import Manifest, ShardFormatError
from retro.data.prepare import build_parser, prepare
from retro.data.shards import TokenShards
from retro.inference.validation_loss import token_weighted_loss
from retro.model.loss import IGNORE_INDEX

# turn_tokenizer: [UNK] 0, [EOS] 1, w0..w49 = 2..51, <|system|> 52, <|user|> 53, <|assistant|> 54, <|end|> 55
WORDS = 50
ASSISTANT, END, EOS = 54, 55, 1
T = 16

# A two-turn conversation and, written out by hand, its tokens and which of them the loss counts.
TWO_TURNS = [
    {"role": "system", "content": "w1"},
    {"role": "user", "content": "w2 w3"},
    {"role": "assistant", "content": "w4 w5"},
    {"role": "user", "content": "w6"},
    {"role": "assistant", "content": "w7"},
]
# <|system|> w1 <|end|> <|user|> w2 w3 <|end|> <|assistant|> w4 w5 <|end|> <|user|> w6 <|end|>
# <|assistant|> w7 <|end|> [EOS]
TWO_TURNS_IDS = [52, 3, 55, 53, 4, 5, 55, 54, 6, 7, 55, 53, 8, 55, 54, 9, 55, 1]
TWO_TURNS_MASK = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0]


def reference_mask(ids: np.ndarray) -> np.ndarray:
    """TURN_TEMPLATE's assistant tokens read off the ids: after each <|assistant|>, through its <|end|>."""
    mask, inside = np.zeros(len(ids), dtype=np.uint8), False
    for i, token in enumerate(ids.tolist()):
        if inside:
            mask[i] = 1
            inside = token != END
        elif token == ASSISTANT:
            inside = True
    return mask


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return turn_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


@pytest.fixture(scope="module")
def chats_dir(tmp_path_factory, tok) -> Path:
    """Chats of words w0..w29 in several small shards (windows cross documents and shards)."""
    d = tmp_path_factory.mktemp("chats")
    src = write_chats(d / "chats.jsonl", random_chats(120, 30, seed=1))
    return prepare_dir(d / "out", [src], tok, "--chat", "--val-fraction", "0.1", "--shard-tokens", "300")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, tok) -> Path:
    """Plain text of words w40..w49 with the same tokenizer (no mask)."""
    d = tmp_path_factory.mktemp("plain")
    src = write_jsonl(d / "plain.jsonl", random_docs(150, WORDS, seed=2, low=40, min_len=5))
    return prepare_dir(d / "out", [src], tok, "--val-fraction", "0.1")


def stream_of(path: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    shards = TokenShards(path, split)
    ids = shards.read(0, shards.num_tokens).astype(np.int64)
    return ids, reference_mask(ids)


def expected_labels(ids: np.ndarray, mask: np.ndarray, start: int) -> np.ndarray:
    """Labels of the window at `start`: token t + 1, or IGNORE_INDEX where token t + 1 is not a loss token."""
    nxt = ids[start + 1 : start + T + 1]
    return np.where(mask[start + 1 : start + T + 1] == 1, nxt, IGNORE_INDEX)


# --- prepare: the mask of a conversation -------------------------------------------------------
def test_two_turn_mask_is_the_assistants_content_and_end_of_turn(tmp_path, tok):
    src = write_chats(tmp_path / "c.jsonl", [TWO_TURNS])
    s = TokenShards(prepare_dir(tmp_path / "out", [src], tok, "--chat", "--val-fraction", "0"), verify="full")
    assert s.document(0).tolist() == TWO_TURNS_IDS
    assert s.document_mask(0).tolist() == TWO_TURNS_MASK
    assert s.masked and s.manifest.loss_on == "assistant" and s.num_loss_tokens == 5
    raw = json.loads((s.directory / "manifest.json").read_text())
    assert raw["format_version"] == 2 and raw["splits"]["train"]["shards"][0]["loss_tokens"] == 5
    assert (s.directory / "train-00000.mask").read_bytes() == bytes(TWO_TURNS_MASK)


def test_masks_from_two_encoding_processes_are_the_same(tmp_path, tok, chats_dir):
    src = write_chats(tmp_path / "chats.jsonl", random_chats(120, 30, seed=1))  # chats_dir's input
    args = ("--chat", "--val-fraction", "0.1", "--shard-tokens", "300", "--num-proc", "2", "--batch-docs", "7")
    out = prepare_dir(tmp_path / "out", [src], tok, *args)
    names = sorted(p.name for p in chats_dir.iterdir() if p.suffix in (".bin", ".idx", ".mask"))
    assert names == sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".idx", ".mask"))
    assert any(n.endswith(".mask") for n in names)
    for name in names:
        assert (out / name).read_bytes() == (chats_dir / name).read_bytes(), name


def test_loss_on_all_keeps_the_ids_and_writes_the_old_format(tmp_path, tok):
    src = write_chats(tmp_path / "c.jsonl", [TWO_TURNS])
    out = prepare_dir(tmp_path / "out", [src], tok, "--chat", "--loss-on", "all", "--val-fraction", "0")
    s = TokenShards(out)
    assert s.document(0).tolist() == TWO_TURNS_IDS and not s.masked
    assert s.document_mask(0).tolist() == [1] * len(TWO_TURNS_IDS)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == 1 and "loss_on" not in raw
    assert "mask_file" not in raw["splits"]["train"]["shards"][0]
    assert not list(out.glob("*.mask"))


def test_tokens_straddling_a_span_edge_count():
    offsets = [(0, 3), (3, 6), (6, 9), (9, 9), (9, 12)]
    assert spans_to_mask(offsets, [(4, 7)]).tolist() == [0, 1, 1, 0, 0]  # any shared character counts
    assert spans_to_mask(offsets, [(3, 6), (9, 12)]).tolist() == [0, 1, 0, 0, 1]  # half-open, empty tokens never
    assert spans_to_mask([], [(0, 1)]).tolist() == [] and spans_to_mask(offsets, []).tolist() == [0] * 5


def prepare_raising(argv: list[str]) -> None:
    args = build_parser().parse_args(argv + ["--quiet", "--val-fraction", "0"])
    args.text_field = args.text_field or ("messages" if args.chat else "text")
    prepare(args)


def test_bad_settings_and_templates_are_refused(tmp_path, tok):
    plain = write_jsonl(tmp_path / "p.jsonl", ["w1 w2"])
    base = ["--tokenizer", str(tok), "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="--loss-on assistant needs --chat"):
        prepare_raising(["--input", str(plain), "--loss-on", "assistant", *base])
    no_assistant = write_chats(tmp_path / "u.jsonl", [[{"role": "user", "content": "w1"}]])
    with pytest.raises(ValueError, match="no assistant tokens in the train split"):
        prepare_raising(["--input", str(no_assistant), "--chat", *base])
    # a template that renders the last turn differently: the prefixes are not prefixes of the whole
    odd = tmp_path / "odd"
    shutil.copytree(tok, odd)
    config = json.loads((odd / "tokenizer_config.json").read_text())
    last_differs = "{% if not loop.last %}<|end|> {% endif %}{% endfor %}"
    config["chat_template"] = TURN_TEMPLATE.replace("<|end|> {% endfor %}", last_differs)
    (odd / "tokenizer_config.json").write_text(json.dumps(config))
    for f in odd.glob("chat_template.*"):
        f.unlink()
    chats = write_chats(tmp_path / "c.jsonl", [TWO_TURNS])
    with pytest.raises(ValueError, match=r"rows 0\.\.0 cannot be encoded .*prefix by prefix.*--loss-on all"):
        prepare_raising(["--input", str(chats), "--chat", "--tokenizer", str(odd), "--out", str(tmp_path / "o2")])


def test_a_template_without_generation_prompt_warns(tmp_path, caplog):
    from data_helpers import word_tokenizer  # CHAT_TEMPLATE: no generation prompt, no end-of-turn token

    tok = word_tokenizer(tmp_path / "tok", 20, chat=True)
    chat = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    src = write_chats(tmp_path / "c.jsonl", [chat])
    with caplog.at_level(logging.WARNING, logger="retro.data.prepare"):
        s = TokenShards(prepare_dir(tmp_path / "out", [src], tok, "--chat", "--val-fraction", "0"))
    assert "writes no generation prompt" in caplog.text
    assert s.document_mask(0).tolist() == [0, 0, 1, 1, 0]  # <|user|> w1 [<|assistant|> w2] [EOS]: the header counts


# --- the loss on a two-turn conversation, by hand ----------------------------------------------
def test_masked_loss_equals_the_hand_computed_one(tmp_path, tok):
    src = write_chats(tmp_path / "c.jsonl", [TWO_TURNS])
    out = prepare_dir(tmp_path / "out", [src], tok, "--chat", "--val-fraction", "0")
    seq = len(TWO_TURNS_IDS) - 1  # one window: the whole conversation
    batch = next(iter(build_train_loader([out], None, seq, 1, 0, 1, seed=0)))
    assert batch["input_ids"][0].tolist() == TWO_TURNS_IDS[:-1]
    want = [y if m else IGNORE_INDEX for y, m in zip(TWO_TURNS_IDS[1:], TWO_TURNS_MASK[1:])]
    assert batch["labels"][0].tolist() == want  # the label side: token t + 1 and its mask
    model = tiny_recurrent()
    with torch.no_grad():
        logits = model(batch["input_ids"], num_recurrences=2, generator=torch.Generator().manual_seed(0)).logits[0]
        loss = model(
            batch["input_ids"],
            shift_labels=batch["labels"],
            num_recurrences=2,
            return_logits=False,
            generator=torch.Generator().manual_seed(0),
        ).loss
    # by hand: position t predicts token t + 1; only the 5 assistant tokens (w4 w5 <|end|>, w7 <|end|>) count
    terms = [
        -torch.log_softmax(logits[t].double(), -1)[TWO_TURNS_IDS[t + 1]] for t in range(seq) if TWO_TURNS_MASK[t + 1]
    ]
    assert len(terms) == 5
    by_hand = sum(terms) / len(terms)
    assert abs(loss.item() - by_hand.item()) <= 1e-6 * by_hand.item()
    every_token = F.cross_entropy(logits.double(), torch.tensor(TWO_TURNS_IDS[1:]))
    assert abs(every_token.item() - by_hand.item()) > 1e-3  # the mask changes the loss


def test_a_window_without_loss_tokens_gives_zero_loss_and_gradient_not_nan():
    model = tiny_recurrent()
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE_INDEX)
    loss = model(ids, shift_labels=labels, num_recurrences=2, return_logits=False).loss
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


# --- the mask through the loader: packing, resume, mixtures, validation -------------------------
def window_start(ids: np.ndarray, row: torch.Tensor) -> int:
    starts = [j * T for j in range((len(ids) - 1) // T) if np.array_equal(ids[j * T : j * T + T], row.numpy())]
    assert len(starts) == 1, "the row is not one stride-T window of the stream"
    return starts[0]


def test_mask_is_on_the_label_side_across_documents_and_shards(chats_dir):
    ids, mask = stream_of(chats_dir)
    shards = TokenShards(chats_dir)
    assert len(shards.shards) > 3
    assert np.array_equal(shards.read_mask(0, shards.num_tokens), mask)  # prepare's mask = the template's turns
    loader = build_train_loader([chats_dir], None, T, 4, 0, 1, seed=3)
    crossing = 0
    for batch, _ in zip(loader, range(12)):
        for x, y in zip(batch["input_ids"], batch["labels"]):
            s = window_start(ids, x)
            assert np.array_equal(y.numpy(), expected_labels(ids, mask, s))
            crossing += int((x[1:] == EOS).any())
    assert crossing > 10  # most windows pack the end of one conversation and the start of the next
    labels = torch.cat([b["labels"].flatten() for b, _ in zip(loader, range(4))])
    assert 0 < (labels != IGNORE_INDEX).float().mean() < 0.7


def test_resume_mid_epoch_reproduces_the_masked_labels(chats_dir):
    loader = build_train_loader([chats_dir], None, T, 4, 0, 1, seed=5)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(6)]  # crosses into the next epoch (train has ~25 windows)
    resumed = build_train_loader([chats_dir], None, T, 4, 0, 1, seed=5, num_workers=1)  # masks read in a worker
    resumed.load_state_dict(state)
    got = [b for b, _ in zip(resumed, range(6))]
    for a, b in zip(expected, got):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert any((b["labels"] == IGNORE_INDEX).any() for b in got)


def test_mixture_of_a_masked_and_an_unmasked_source(chats_dir, plain_dir):
    chat_ids, chat_mask = stream_of(chats_dir)
    plain_ids = stream_of(plain_dir)[0]
    loader = build_train_loader([chats_dir, plain_dir], [0.5, 0.5], T, 4, 0, 1, seed=7)
    seen = {"chat": 0, "plain": 0}
    it = iter(loader)
    for _ in range(10):
        batch = next(it)
        for x, y in zip(batch["input_ids"], batch["labels"]):
            if ((x >= 42) & (x < 52)).any():  # words w40..w49: only the plain source has them
                s = window_start(plain_ids, x)
                assert torch.equal(y, torch.from_numpy(plain_ids[s + 1 : s + T + 1]))  # every token counts
                seen["plain"] += 1
            else:
                s = window_start(chat_ids, x)
                assert np.array_equal(y.numpy(), expected_labels(chat_ids, chat_mask, s))
                seen["chat"] += 1
    assert seen["chat"] >= 15 and seen["plain"] >= 15
    state = loader.state_dict()
    after = next(it)
    resumed = build_train_loader([chats_dir, plain_dir], [0.5, 0.5], T, 4, 0, 1, seed=7)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["labels"], after["labels"])


def test_validation_counts_only_loss_tokens(chats_dir):
    ids, mask = stream_of(chats_dir, "val")
    batches = build_val_batches(chats_dir, T, 2, 0, 1)
    model = tiny_recurrent().eval()
    result = token_weighted_loss(model, batches, 2, lambda i: torch.Generator().manual_seed(i), "cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            logits = model(batch["input_ids"], num_recurrences=2, generator=torch.Generator().manual_seed(i)).logits
            for x, row_logits in zip(batch["input_ids"], logits):
                s = window_start(ids, x)
                y = torch.from_numpy(expected_labels(ids, mask, s))
                total += F.cross_entropy(row_logits.double(), y, ignore_index=IGNORE_INDEX, reduction="sum").item()
                count += int((y != IGNORE_INDEX).sum())
    assert result.tokens == count and 0 < count < len(batches) * 2 * T
    assert abs(result.loss - total / count) <= 1e-6 * result.loss


# --- the shard format: old sets, missing or damaged masks --------------------------------------
def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(d: Path, edit) -> None:
    raw = json.loads((d / "manifest.json").read_text())
    edit(raw)
    (d / "manifest.json").write_text(json.dumps(raw))


def test_an_unmasked_set_reads_as_before(plain_dir):
    raw = json.loads((plain_dir / "manifest.json").read_text())
    assert raw["format_version"] == 1 and "loss_on" not in raw
    s = TokenShards(plain_dir, verify="full")
    assert not s.masked and s.num_loss_tokens == s.num_tokens
    assert s.read_mask(3, 5).tolist() == [1] * 5


def test_missing_or_damaged_masks_are_named(chats_dir, tmp_path):
    d = copy_of(chats_dir, tmp_path / "missing")
    (d / "train-00001.mask").unlink()
    with pytest.raises(ShardFormatError, match=r"train-00001\.mask: file listed in .* is missing"):
        TokenShards(d)
    d = copy_of(chats_dir, tmp_path / "short")
    with open(d / "train-00002.mask", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ShardFormatError, match=r"train-00002\.mask: size 10 bytes, manifest says \d+ bytes"):
        TokenShards(d)
    d = copy_of(chats_dir, tmp_path / "flipped")
    with open(d / "train-00000.mask", "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([1 - first[0]]))
    TokenShards(d)  # same size: the cheap check passes
    with pytest.raises(ShardFormatError, match=r"train-00000\.mask: SHA-256"):
        TokenShards(d, verify="full")
    d = copy_of(chats_dir, tmp_path / "unlisted")
    edit_manifest(d, lambda raw: raw["splits"]["val"]["shards"][0].pop("mask_file"))
    with pytest.raises(ShardFormatError, match="split 'val' shard val-00000.bin lists no mask file"):
        TokenShards(d)


def test_manifest_versions_and_loss_on_are_checked(chats_dir, plain_dir, tmp_path):
    d = copy_of(chats_dir, tmp_path / "v1")
    edit_manifest(d, lambda raw: raw.update(format_version=1))
    with pytest.raises(ShardFormatError, match="loss_on 'assistant' needs format_version 2"):
        Manifest.load(d)
    d = copy_of(chats_dir, tmp_path / "v3")
    edit_manifest(d, lambda raw: raw.update(format_version=3))
    with pytest.raises(ShardFormatError, match=r"format_version 3 is not supported \(this reader: 1, 2\)"):
        Manifest.load(d)
    d = copy_of(chats_dir, tmp_path / "odd")
    edit_manifest(d, lambda raw: raw.update(loss_on="user"))
    with pytest.raises(ShardFormatError, match="loss_on 'user' is not one of"):
        Manifest.load(d)
    d = copy_of(plain_dir, tmp_path / "stray")
    edit_manifest(d, lambda raw: raw["splits"]["train"]["shards"][0].update(mask_file="x.mask"))
    with pytest.raises(ShardFormatError, match="lists a mask, but loss_on is 'all'"):
        Manifest.load(d)


def test_full_verify_checks_mask_values_and_count(chats_dir, tmp_path):
    d = copy_of(chats_dir, tmp_path / "count")
    edit_manifest(d, lambda raw: raw["splits"]["train"]["shards"][1].update(loss_tokens=1))
    with pytest.raises(ShardFormatError, match=r"train-00001\.mask: \d+ loss tokens, the manifest says 1"):
        TokenShards(d, "train", verify="none").verify_token_range()
    d = copy_of(chats_dir, tmp_path / "two")
    with open(d / "train-00000.mask", "r+b") as f:
        f.write(b"\x02")
    with pytest.raises(ShardFormatError, match=r"train-00000\.mask: holds 2; a loss mask is 0 or 1"):
        TokenShards(d, "train", verify="none").verify_token_range()


def test_inspect_shows_the_share_and_the_loss_tokens(tmp_path, tok, capsys):
    src = write_chats(tmp_path / "c.jsonl", [TWO_TURNS])
    out = prepare_dir(tmp_path / "out", [src], tok, "--chat", "--val-fraction", "0")
    assert inspect_shards.main([str(out), "--samples", "1", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "loss_on assistant" in text and f"loss tokens {5 / 18:.1%}" in text
    assert "[train doc 0: 18 tokens, 5 loss tokens]" in text
    assert "[[w4 w5 <|end|>]]" in text and "[[w7 <|end|>]]" in text
