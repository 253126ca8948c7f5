"""retro.data.prepare / shards / inspect: round trips, formats, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parents[1]))
from data_helpers import CHAT_TEMPLATE, prepare_dir, random_docs, word_tokenizer, write_jsonl  # noqa: E402

from retro.data import inspect_shards as inspect_cli  # noqa: E402
from retro.data.manifest import Manifest, ShardFormatError, vocab_hash  # noqa: E402
from retro.data.prepare import main as prepare_main  # noqa: E402
from retro.data.shards import TokenShards, check_tokenizer_matches  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok16(tmp_path_factory) -> Path:
    return word_tokenizer(tmp_path_factory.mktemp("tok16"), 100)


@pytest.fixture(scope="module")
def prepared16(tmp_path_factory, tok16) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("p16")
    docs = random_docs(200, 100, seed=3)
    out = prepare_dir(
        d / "out", [write_jsonl(d / "in.jsonl", docs)], tok16, "--val-fraction", "0.1", "--shard-tokens", "500"
    )
    return out, docs


def expected(tokenizer, text: str, eos: int) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]


def test_round_trip_uint16(prepared16, tok16):
    out, docs = prepared16
    tk = AutoTokenizer.from_pretrained(tok16)
    train, val = TokenShards(out, "train", verify="full"), TokenShards(out, "val", verify="full")
    assert train.dtype == np.uint16 and train.vocab_size == len(tk) == 102 and train.eos_id == 1
    assert train.vocab_hash == vocab_hash(tk) and train.tokenizer_name == str(tok16)
    assert len(train.shards) > 3  # several shards, read back as one stream
    # every 10th document (index 9, 19, ...) goes to val, the rest to train, in order
    want_train = [t for i, t in enumerate(docs) if i % 10 != 9]
    want_val = [t for i, t in enumerate(docs) if i % 10 == 9]
    assert train.num_docs == len(want_train) and val.num_docs == len(want_val)
    for shards, texts in ((train, want_train), (val, want_val)):
        flat = []
        for k, text in enumerate(texts):
            ids = expected(tk, text, 1)
            assert shards.document(k).tolist() == ids
            flat += ids
        assert shards.read(0, shards.num_tokens).tolist() == flat
        starts = np.cumsum([0] + [len(expected(tk, t, 1)) for t in texts[:-1]])
        assert shards.doc_starts(0, shards.num_tokens).tolist() == starts.tolist()
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["num_tokens"] == train.num_tokens
    assert all(len(s["sha256"]) == 64 for s in m["splits"]["train"]["shards"])


def test_round_trip_uint32_cli_two_processes(tmp_path):
    """A vocabulary of 70002 ids needs uint32; runs the real CLI with 2 encoding processes."""
    tok = word_tokenizer(tmp_path / "tok", 70000)
    docs = random_docs(60, 70000, seed=5, low=65000)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "retro.data.prepare",
            "--input",
            str(src),
            "--tokenizer",
            str(tok),
            "--out",
            str(tmp_path / "out"),
            "--num-proc",
            "2",
            "--batch-docs",
            "7",
            "--val-fraction",
            "0",
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    s = TokenShards(tmp_path / "out", verify="full")
    tk = AutoTokenizer.from_pretrained(tok)
    assert s.dtype == np.uint32 and s.vocab_size == 70002
    got = [s.document(k).tolist() for k in range(s.num_docs)]
    assert got == [expected(tk, t, 1) for t in docs]  # also checks order across processes
    assert max(max(g) for g in got) > 65535


def test_chat_template_rendering(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", 50, chat=True)
    convs = [
        [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}],
        [{"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5 w6 w7"}],
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = prepare_dir(tmp_path / "out", [src], tok, "--chat", "--val-fraction", "0")
    tk = AutoTokenizer.from_pretrained(tok)
    s = TokenShards(out)
    for k, c in enumerate(convs):
        want = expected(tk, tk.apply_chat_template(c, tokenize=False), tk.eos_token_id)
        assert s.document(k).tolist() == want
        assert want[0] == tk.convert_tokens_to_ids("<|user|>")


def test_globs_txt_and_parquet(tmp_path, tok16):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b = random_docs(5, 100, seed=1), random_docs(4, 100, seed=2)
    write_jsonl(tmp_path / "p1.jsonl", a)
    write_jsonl(tmp_path / "p2.jsonl", b)
    (tmp_path / "t.txt").write_text("w1 w2\n\nw3\n")
    pq.write_table(pa.table({"text": ["w7 w8", "w9"]}), tmp_path / "q.parquet")
    out = prepare_dir(
        tmp_path / "out",
        [tmp_path / "p*.jsonl", tmp_path / "t.txt", tmp_path / "q.parquet"],
        tok16,
        "--val-fraction",
        "0",
    )
    tk = AutoTokenizer.from_pretrained(tok16)
    s = TokenShards(out)
    texts = a + b + ["w1 w2", "w3", "w7 w8", "w9"]  # the blank .txt line encodes to nothing: skipped
    assert [s.document(k).tolist() for k in range(s.num_docs)] == [expected(tk, t, 1) for t in texts]
    assert s.manifest.skipped_empty_docs == 1


def test_no_append_eos_and_atomic_output(tmp_path, tok16):
    src = write_jsonl(tmp_path / "in.jsonl", ["w1 w2", "w3"])
    out = tmp_path / "out"
    (tmp_path / ".out.partial").mkdir()  # debris of an interrupted run is cleaned, not trusted
    (tmp_path / ".out.partial" / "train-00000.bin").write_bytes(b"junk")
    prepare_dir(out, [src], tok16, "--no-append-eos", "--val-fraction", "0")
    assert TokenShards(out).read(0, 3).tolist() == [3, 4, 5] and not (tmp_path / ".out.partial").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_main_raising(["--input", str(src), "--tokenizer", str(tok16), "--out", str(out), "--quiet"])
    prepare_dir(out, [src], tok16, "--overwrite", "--val-fraction", "0")
    assert TokenShards(out).read(0, 5).tolist() == [3, 4, 1, 5, 1]


def prepare_main_raising(argv: list[str]) -> None:
    """Call prepare() directly so the test sees the exception (main() turns it into exit code 2)."""
    from retro.data.prepare import build_parser, prepare

    args = build_parser().parse_args(argv)
    args.text_field = args.text_field or ("messages" if args.chat else "text")
    prepare(args)


# --- bad inputs: each error names the offending file ----------------------------------------
def copy_prepared(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_named(prepared16, tmp_path):
    d = copy_prepared(prepared16[0], tmp_path / "c")
    shard = d / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardFormatError, match=r"train-00001\.bin: size .* truncated"):
        TokenShards(d)


def test_altered_shard_named(prepared16, tmp_path, capsys):
    d = copy_prepared(prepared16[0], tmp_path / "c")
    shard = d / "train-00002.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 1
    shard.write_bytes(bytes(raw))
    TokenShards(d)  # same size: the cheap check cannot see it ...
    with pytest.raises(ShardFormatError, match=r"train-00002\.bin: SHA-256 .* does not match"):
        TokenShards(d, verify="full")  # ... the full one does
    assert inspect_cli.main([str(d), "--verify", "--no-decode"]) == 2
    assert "train-00002.bin" in capsys.readouterr().err


def test_tokenizer_mismatch_named(prepared16, tok16, tmp_path):
    out = prepared16[0]
    check_tokenizer_matches(out, tok16)  # the right one passes, by path, object and size
    check_tokenizer_matches(TokenShards(out), AutoTokenizer.from_pretrained(tok16))
    check_tokenizer_matches(Manifest.load(out), 128)
    other = word_tokenizer(tmp_path / "other", 100)
    with open(other / "tokenizer.json") as f:  # same size, one token renamed
        j = json.load(f)
    j["model"]["vocab"]["w99x"] = j["model"]["vocab"].pop("w99")
    (other / "tokenizer.json").write_text(json.dumps(j))
    with pytest.raises(ShardFormatError, match=r"manifest\.json: data/tokenizer vocab mismatch.*other"):
        check_tokenizer_matches(out, other)
    with pytest.raises(ShardFormatError, match=r"manifest\.json: .*vocab_size 102.* 64 entries"):
        check_tokenizer_matches(out, 64)


def test_ids_beyond_vocab_named(tmp_path, prepared16):
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[EOS]": 1, "w0": 2, "big": 500}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        str(tmp_path / "holes")
    )
    src = write_jsonl(tmp_path / "holes.jsonl", ["w0", "w0 big"])
    with pytest.raises(ValueError, match=r"holes\.jsonl: rows 0\.\.1 encode to token id 500, outside"):
        prepare_main_raising(
            ["--input", str(src), "--tokenizer", str(tmp_path / "holes"), "--out", str(tmp_path / "o"), "--quiet"]
        )
    assert not (tmp_path / "o").exists()
    with pytest.raises(ShardFormatError, match=r"train-0000\d\.bin: token id \d+ is beyond the vocabulary size 50"):
        TokenShards(prepared16[0]).verify_token_range(50)


def test_empty_inputs_named(tmp_path, tok16):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = ["--tokenizer", str(tok16), "--out", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(ValueError, match=r"empty\.jsonl: input file is empty"):
        prepare_main_raising(["--input", str(empty), *base])
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    with pytest.raises(ValueError, match=r"blank\.jsonl: empty input"):
        prepare_main_raising(["--input", str(blank), *base])
    with pytest.raises(FileNotFoundError, match=r"nomatch\*\.jsonl.*no files match"):
        prepare_main_raising(["--input", str(tmp_path / "nomatch*.jsonl"), *base])
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_missing_text_field_named(tmp_path, tok16):
    src = write_jsonl(tmp_path / "body.jsonl", ["w1"], field="body")
    with pytest.raises(KeyError, match=r"body\.jsonl: no field 'text' \(fields: \['body'\]\)"):
        prepare_main_raising(["--input", str(src), "--tokenizer", str(tok16), "--out", str(tmp_path / "o"), "--quiet"])
    # the CLI reports it as an error line and exit code 2
    assert prepare_main(["--input", str(src), "--tokenizer", str(tok16), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    prepare_dir(tmp_path / "o", [src], tok16, "--text-field", "body", "--val-fraction", "0")


def test_inspect_decodes(prepared16, capsys):
    out, docs = prepared16
    assert inspect_cli.main([str(out), "--samples", "2", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "checksums and id range OK" in text and "split train" in text
    assert docs[0] in text and docs[9] in text  # first train doc and first val doc, decoded


# --- special tokens: a BOS per document by default, as the paper's add_special_tokens=True -----------
def bos_tokenizer(directory: Path, num_words: int = 20, chat: bool = False) -> Path:
    """Llama-like: a post-processor puts [BOS] before every encoded text (add_special_tokens=True)."""
    from tokenizers import processors

    vocab = {"[UNK]": 0, "[EOS]": 1, "[BOS]": 2, **{f"w{i}": i + 3 for i in range(num_words)}}
    if chat:
        vocab.update({"<|user|>": len(vocab), "<|assistant|>": len(vocab) + 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]")
    if chat:  # a Llama-style template that writes the BOS itself
        fast.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return directory


def test_bos_added_per_document_by_default(tmp_path):
    tok = bos_tokenizer(tmp_path / "tok")
    src = write_jsonl(tmp_path / "in.jsonl", ["w1 w2", "", "w3"])  # the empty document stays skipped
    out = prepare_dir(tmp_path / "out", [src], tok, "--val-fraction", "0")
    s = TokenShards(out)
    assert [s.document(k).tolist() for k in range(s.num_docs)] == [[2, 4, 5, 1], [2, 6, 1]]
    assert s.manifest.add_special_tokens is True and s.manifest.bos_id == 2 and s.manifest.skipped_empty_docs == 1
    assert json.loads((out / "manifest.json").read_text())["add_special_tokens"] is True
    off = prepare_dir(tmp_path / "off", [src], tok, "--val-fraction", "0", "--no-add-special-tokens")
    s = TokenShards(off)
    assert [s.document(k).tolist() for k in range(s.num_docs)] == [[4, 5, 1], [6, 1]]
    assert s.manifest.add_special_tokens is False and s.manifest.bos_id is None


def test_bos_matches_the_tokenizers_own_special_tokens(tmp_path):
    """The documents are exactly what tokenizer(text, add_special_tokens=True) gives, plus EOS."""
    tok = bos_tokenizer(tmp_path / "tok", num_words=100)
    docs = random_docs(30, 100, seed=4)
    out = prepare_dir(tmp_path / "out", [write_jsonl(tmp_path / "in.jsonl", docs)], tok, "--val-fraction", "0")
    tk = AutoTokenizer.from_pretrained(tok)
    s = TokenShards(out)
    assert [s.document(k).tolist() for k in range(s.num_docs)] == [tk(t)["input_ids"] + [1] for t in docs]


def test_no_bos_tokenizer_unchanged(tmp_path, tok16):
    src = write_jsonl(tmp_path / "in.jsonl", ["w1 w2", "w3"])
    out = prepare_dir(tmp_path / "out", [src], tok16, "--val-fraction", "0")
    s = TokenShards(out)
    assert s.read(0, s.num_tokens).tolist() == [3, 4, 1, 5, 1]  # nothing added: the tokenizer has no BOS
    assert s.manifest.add_special_tokens is True and s.manifest.bos_id is None


def test_chat_template_with_bos_gets_one_bos(tmp_path):
    tok = bos_tokenizer(tmp_path / "tok", chat=True)
    src = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    src.write_text(json.dumps({"messages": chat}) + "\n")
    s = TokenShards(prepare_dir(tmp_path / "out", [src], tok, "--chat", "--val-fraction", "0"))
    doc = s.document(0).tolist()
    assert doc[0] == 2 and doc.count(2) == 1 and doc[-1] == 1
    # [BOS] <|user|> w1 <|assistant|> w2 [EOS]: the BOS and EOS are no loss tokens (this template has no
    # generation prompt, so the assistant's header counts)
    assert s.document_mask(0).tolist() == [0, 0, 0, 1, 1, 0]


def test_manifest_without_special_token_fields_reads_as_false(prepared16, tmp_path):
    d = copy_prepared(prepared16[0], tmp_path / "old")
    raw = json.loads((d / "manifest.json").read_text())
    for key in ("add_special_tokens", "bos_id"):
        raw.pop(key, None)
    (d / "manifest.json").write_text(json.dumps(raw))
    m = Manifest.load(d)
    assert m.add_special_tokens is False and m.bos_id is None
