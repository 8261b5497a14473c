"""`reft-ext train` / `reft-ext generate` (reft_ext/cli/): bad inputs, a tiny end-to-end
run, and (slow) the built-in default run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import reft_ext  # noqa: E402
from reft_ext.__main__ import main  # noqa: E402
from reft_ext.cli import DEFAULT_DATA, DEFAULT_MODEL, load_data  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer byte-level Llama (d=32) and six records."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from reft_ext.cli._bytetok import ByteTokenizer

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=256, bos_token_id=257,
                      eos_token_id=258)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    ByteTokenizer().save(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": w, "response": f"__{w}__"}) + "\n"
                            for w in ["len", "iter", "add", "sub", "mul", "eq"]))
    return root / "model", data


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _bad(capsys, *argv, match: str):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("reft-ext "), lines
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


def test_train_missing_data(capsys, tmp_path, tiny):
    model, _ = tiny
    out = tmp_path / "out"
    _bad(capsys, "train", "--model", str(model), "--data", str(tmp_path / "nope.jsonl"),
         "--output", str(out), match="no such file")
    assert not out.exists()


@pytest.mark.parametrize("line, match", [
    ("{not json", ":2: not valid JSON"),
    ("[1, 2]", ":2: expected a JSON object"),
    ('{"prompt": "x"}', ':2: "response" must be a non-empty string'),
    ('{"prompt": 3, "response": "y"}', ':2: "prompt" must be a non-empty string'),
])
def test_train_malformed_jsonl(capsys, tmp_path, tiny, line, match):
    model, _ = tiny
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    out = tmp_path / "out"
    _bad(capsys, "train", "--model", str(model), "--data", str(data), "--output", str(out),
         match=match)
    assert not out.exists()


def test_train_model_not_a_causal_lm(capsys, tmp_path, tiny):
    model, data = tiny
    from transformers import DistilBertConfig
    bert = tmp_path / "distilbert"
    bert.mkdir()
    DistilBertConfig(dim=32, n_layers=1, n_heads=2,
                     hidden_dim=32).to_json_file(bert / "config.json")
    out = tmp_path / "out"
    _bad(capsys, "train", "--model", str(bert), "--data", str(data), "--output", str(out),
         match="not a causal language model")
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(capsys, "train", "--model", str(empty), "--data", str(data), "--output", str(out),
         match="no config.json")
    (empty / "config.json").write_text((model / "config.json").read_text())
    _bad(capsys, "train", "--model", str(empty), "--data", str(data), "--output", str(out),
         match="cannot load the model")
    _bad(capsys, "train", "--model", str(tmp_path / "missing"), "--data", str(data),
         "--output", str(out), match="no such directory")
    assert not out.exists()


def test_train_layers_and_rank_out_of_range(capsys, tmp_path, tiny):
    model, data = tiny
    out = tmp_path / "out"
    common = ["train", "--model", str(model), "--data", str(data), "--output", str(out)]
    _bad(capsys, *common, "--layers", "0,5", match="layer 5 is out of range")
    _bad(capsys, *common, "--layers", "a", match="comma-separated integers")
    _bad(capsys, *common, "--rank", "33", match="exceeds the hidden size d=32")
    _bad(capsys, *common, "--rank", "0", match="must be >= 1")
    _bad(capsys, *common, "--positions", "middle", match="--positions middle")
    _bad(capsys, *common, "--steps", "x", match="invalid int value")
    _bad(capsys, *common, "--no-such-flag", match="unrecognized arguments")
    assert not out.exists()


def test_train_refuses_foreign_output_dir(capsys, tmp_path, tiny):
    model, data = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _bad(capsys, "train", "--model", str(model), "--data", str(data), "--output", str(out),
         match="not a reft_ext checkpoint")
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_train_then_generate(capsys, tmp_path, tiny):
    model_dir, data = tiny
    out = tmp_path / "ckpt"
    rc, text, err = _run(capsys, "train", "--model", str(model_dir), "--data", str(data),
                         "--steps", "3", "--batch-size", "4", "--rank", "2",
                         "--layers", "0,1", "--heldout-fraction", "0.2",
                         "--output", str(out))
    assert rc == 0, err
    assert "trainable params:" in text
    assert "exact match" in text and "frozen base" in text and "with LoReFT" in text
    assert "held-out prompts" in text and "tok/s" in text
    cfg = json.loads((out / "reft_config.json").read_text())
    assert cfg["layers"] == [0, 1] and cfg["rank"] == 2

    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    reft_ext.load(base, out)
    assert sorted(reft_ext.interventions(base)) == [0, 1]

    rc, text, err = _run(capsys, "generate", "--model", str(model_dir), "--reft", str(out),
                         "--prompt", "len", "--max-new-tokens", "4")
    assert rc == 0, err
    assert len(text.splitlines()) == 1
    # retraining into the same checkpoint directory replaces it
    rc, _, err = _run(capsys, "train", "--model", str(model_dir), "--data", str(data),
                      "--steps", "1", "--output", str(out), "--examples", "0")
    assert rc == 0, err


def test_generate_bad_inputs(capsys, tmp_path, tiny):
    model_dir, _ = tiny
    _bad(capsys, "generate", "--model", str(model_dir), "--reft", str(tmp_path),
         "--prompt", "x", match="not a reft_ext checkpoint directory")
    _bad(capsys, "generate", "--model", str(model_dir), "--prompt", "x",
         match="--reft")


def test_builtin_model_and_data_ship():
    records = load_data(DEFAULT_DATA)
    assert len(records) >= 100
    assert {r["split"] for r in records} == {"train", "heldout"}
    assert all(r["prompt"].startswith("__") and r["response"] == "__" for r in records)
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size < 8 * 2**20


def test_console_entry_bad_input_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "reft_ext", "train", "--data",
                        str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("reft-ext train: error: --data ")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_default_run(capsys, tmp_path):
    """The README's first command: the built-in default trains and beats the frozen base."""
    rc, text, err = _run(capsys, "train", "--output", str(tmp_path / "out"))
    assert rc == 0, err
    rows = {line.split("prompts")[0].strip(): line for line in text.splitlines()
            if line.strip().startswith(("training prompts", "held-out prompts"))}
    assert set(rows) == {"training", "held-out"}
    pct = [float(x.rstrip("%)")) for x in rows["training"].replace("(", " ").split()
           if x.endswith("%)")]
    before, after = pct
    assert before < 10 and after >= 80, text


def test_train_with_hf_tokenizer(capsys, tmp_path, tiny):
    """A user's model directory with a transformers tokenizer (here a byte-level BPE trained
    offline) instead of the built-in byte tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    _, data = tiny
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["len iter add sub mul eq __len__ __iter__"] * 4,
                           trainers.BpeTrainer(vocab_size=290,
                                               special_tokens=["<pad>", "<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    model_dir = tmp_path / "hf"
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).save_pretrained(model_dir)
    out = tmp_path / "ckpt"
    rc, text, err = _run(capsys, "train", "--model", str(model_dir), "--data", str(data),
                         "--steps", "2", "--output", str(out))
    assert rc == 0, err
    assert "with LoReFT" in text and (out / "reft_config.json").is_file()
    rc, text, err = _run(capsys, "generate", "--model", str(model_dir), "--reft", str(out),
                         "--prompt", "len", "--prompt", "add", "--max-new-tokens", "3")
    assert rc == 0, err
    assert len(text.splitlines()) == 2


# Issue 19 item 4: --help, -h and unknown words used to run the self-check and exit 0.
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_the_commands(capsys, flag):
    rc, out, err = _run(capsys, flag)
    assert rc == 0, err
    assert out.startswith("usage: reft-ext")
    for cmd in ("train", "generate", "check"):
        assert f"\n  {cmd} " in out, out
    assert "self-check" not in out.splitlines()[-1]  # printed the usage, ran no check


@pytest.mark.parametrize("word", ["bogus", "--bogus"])
def test_unknown_command_exits_2_with_one_line(capsys, word):
    rc, out, err = _run(capsys, word)
    assert rc == 2 and out == "", (out, err)
    (line,) = err.strip().splitlines()
    assert line.startswith("reft-ext: error: unknown ") and repr(word) in line, line
    for cmd in ("train", "generate", "check"):
        assert cmd in line


def test_check_subcommand_runs_the_self_check(capsys):
    rc, out, err = _run(capsys, "check")
    assert rc == 0, err
    assert "self-check cpu:" in out
    _bad(capsys, "check", "extra", match="unexpected arguments")


@pytest.mark.parametrize("cmd", ["train", "generate"])
def test_command_help_exits_0(capsys, cmd):
    rc, out, _ = _run(capsys, cmd, "--help")
    assert rc == 0 and out.startswith(f"usage: reft-ext {cmd}")


# Issue 19 item 5: the help shows every default; --layers all; a checkpoint of another model
# under the built-in model names the fix.
@pytest.mark.parametrize("cmd, defaults", [
    ("train", ["--rank RANK", "(default: 4)", "(default: 0.01)", "(default: 16)",
               "(default: float32)", "(default: 0)", "(default: f7+l7)", "(default: 40)",
               "(default: cpu)", "(default: 0.1)", "(default: ./reft_out)"]),
    ("generate", ["(default: 32)", "(default: float32)", "(default: cpu)"]),
])
def test_help_shows_defaults(capsys, cmd, defaults):
    rc, out, _ = _run(capsys, cmd, "--help")
    assert rc == 0
    flat = " ".join(out.split())  # argparse wraps lines
    for d in defaults:
        assert d in flat, (d, out)
    if cmd == "train":
        assert "(default: 4)" in flat.split("--examples EXAMPLES")[1]


def test_train_layers_all(capsys, tmp_path, tiny):
    model_dir, data = tiny
    out = tmp_path / "ckpt"
    rc, text, err = _run(capsys, "train", "--model", str(model_dir), "--data", str(data),
                         "--steps", "1", "--layers", "all", "--examples", "0",
                         "--output", str(out))
    assert rc == 0, err
    assert json.loads((out / "reft_config.json").read_text())["layers"] == [0, 1]
    _bad(capsys, "train", "--model", str(model_dir), "--data", str(data), "--layers", "al",
         "--output", str(tmp_path / "o2"), match="or 'all'")


def test_generate_other_models_checkpoint_says_pass_model(capsys, tmp_path, tiny):
    model_dir, data = tiny  # 2 layers, d=32; the built-in model has 4 layers, d=128
    out = tmp_path / "ckpt"
    rc, _, err = _run(capsys, "train", "--model", str(model_dir), "--data", str(data),
                      "--steps", "1", "--layers", "0", "--examples", "0", "--output", str(out))
    assert rc == 0, err
    _bad(capsys, "generate", "--reft", str(out), "--prompt", "x", match="pass --model DIR")


# Issue 17: several --reft NAME=DIR adapters on one model and a per-prompt adapter
# (--prompts JSONL); each completion printed with its adapter.
@pytest.fixture(scope="module")
def two_adapters(tiny, tmp_path_factory):
    """Checkpoints of two different adapters of the tiny model ("a": LoReFT on layers 0, 1;
    "b": NoReFT on layer 1), their parameters perturbed so that each edit shows."""
    from transformers import AutoModelForCausalLM
    model_dir, _ = tiny
    root = tmp_path_factory.mktemp("adapters")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    reft_ext.patch(model, [0, 1], rank=2, positions="f3+l3", adapter="a")
    reft_ext.patch(model, [1], rank=3, positions="last", adapter="b", intervention="noreft")
    with torch.no_grad():
        for p in model.reft_interventions.parameters():
            p.add_(3 * torch.randn_like(p))
    for name in ("a", "b"):
        reft_ext.save(model, root / name, adapter=name)
    return model_dir, root / "a", root / "b"


def _reference(model_dir, ckpts: dict, prompts, adapters, max_new_tokens, batch_size=64):
    """What each row should get, computed without mixed batches: the same batches run by a
    model holding only that row's checkpoint (None: the unpatched model), row for row."""
    from reft_ext.cli._model import generate, load_model
    out = [None] * len(prompts)
    for name in set(adapters):
        model, tok = load_model(model_dir, "float32", "cpu")
        if name is not None:
            reft_ext.load(model, ckpts[name])
        gen = generate(model, tok, prompts, max_new_tokens, "cpu", batch_size=batch_size)
        for i, a in enumerate(adapters):
            if a == name:
                out[i] = gen[i]
    return out


def _tagged(prompts, adapters, outs):
    return [f"[{a if a is not None else 'base'}] {p!r} -> {g!r}"
            for p, a, g in zip(prompts, adapters, outs)]


def test_generate_several_adapters_per_prompt(capsys, tmp_path, two_adapters):
    model_dir, da, db = two_adapters
    ckpts = {"a": da, "b": db}
    rows = [("len", "a"), ("iter", "b"), ("add", None), ("sub", ...), ("mul", "b"),
            ("eq", "a"), ("len", None), ("len", "b")]
    f = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": p} if a is ... else {"prompt": p, "adapter": a})
             for p, a in rows]
    f.write_text("\n".join(lines[:3] + ["", "  "] + lines[3:]) + "\n")  # blank lines skipped
    n = 6
    common = ["generate", "--model", str(model_dir), "--max-new-tokens", str(n)]

    # --prompt prompts and lines without "adapter" use the first --reft ...
    rc, text, err = _run(capsys, *common, "--reft", f"a={da}", "--reft", f"b={db}",
                         "--prompt", "iter", "--prompts", str(f))
    assert rc == 0, err
    prompts = ["iter"] + [p for p, _ in rows]
    adapters = ["a"] + [("a" if a is ... else a) for _, a in rows]
    want = _reference(model_dir, ckpts, prompts, adapters, n)
    assert text.splitlines() == _tagged(prompts, adapters, want)
    # the test can tell the adapters apart: each changes some completion, differently
    base = _reference(model_dir, ckpts, prompts, [None] * len(prompts), n)
    only_a = _reference(model_dir, ckpts, prompts, ["a"] * len(prompts), n)
    only_b = _reference(model_dir, ckpts, prompts, ["b"] * len(prompts), n)
    assert only_a != base and only_b != base and only_a != only_b

    # ... or --adapter NAME
    adapters2 = ["b"] + [("b" if a is ... else a) for _, a in rows]
    want2 = _reference(model_dir, ckpts, prompts, adapters2, n)
    for order in (["--reft", f"a={da}", "--reft", f"b={db}", "--adapter", "b"],
                  ["--reft", f"b={db}", "--reft", f"a={da}"]):
        rc, text, err = _run(capsys, *common, *order, "--prompt", "iter", "--prompts", str(f))
        assert rc == 0, err
        assert text.splitlines() == _tagged(prompts, adapters2, want2), order

    # each completion is what the one-adapter command gives for that prompt alone
    for p, a, g in zip(prompts, adapters, want):
        if a is not None:
            rc, text, err = _run(capsys, *common, "--reft", str(ckpts[a]), "--prompt", p)
            assert rc == 0, err
            assert text.splitlines() == [g], (p, a)


def test_generate_mixed_batches_split(two_adapters):
    """_model.generate with one adapter per prompt over several batches."""
    from reft_ext.cli._model import generate, load_model
    model_dir, da, db = two_adapters
    prompts = ["len", "iter", "add", "sub", "mul", "eq", "x"]
    adapters = ["b", None, "a", "a", "b", None, "b"]
    model, tok = load_model(model_dir, "float32", "cpu")
    reft_ext.load(model, da, adapter="a")
    reft_ext.load(model, db, adapter="b")
    got = generate(model, tok, prompts, 5, "cpu", batch_size=3, adapters=adapters)
    assert got == _reference(model_dir, {"a": da, "b": db}, prompts, adapters, 5,
                             batch_size=3)
    with pytest.raises(ValueError, match="2 adapters for 7 prompts"):
        generate(model, tok, prompts, 5, "cpu", adapters=["a", "b"])


def test_generate_unnamed_reft_keeps_its_output(capsys, tmp_path, two_adapters):
    model_dir, da, db = two_adapters
    common = ["generate", "--model", str(model_dir), "--max-new-tokens", "5"]
    want = _reference(model_dir, {"a": da}, ["len", "add"], ["a", "a"], 5)
    rc, text, err = _run(capsys, *common, "--reft", str(da), "--prompt", "len")
    assert rc == 0, err
    assert text == want[0] + "\n"                   # one prompt: the completion alone
    rc, text, err = _run(capsys, *common, "--reft", str(da), "--prompt", "len",
                         "--prompt", "add")
    assert rc == 0, err
    assert text.splitlines() == [f"{p!r} -> {g!r}" for p, g in zip(["len", "add"], want)]
    # a directory whose name has '=' in it is a DIR, as before
    odd = tmp_path / "k=v"
    shutil.copytree(da, odd)
    rc, text, err = _run(capsys, *common, "--reft", str(odd), "--prompt", "len")
    assert rc == 0, err
    assert text == want[0] + "\n"
    # with a named one, the unnamed one is the adapter "default"
    rc, text, err = _run(capsys, *common, "--reft", str(da), "--reft", f"b={db}",
                         "--prompt", "len")
    assert rc == 0, err
    assert text.splitlines() == _tagged(["len"], ["default"], want[:1])


def test_generate_several_adapters_bad_inputs(capsys, tmp_path, two_adapters):
    """One line, exit 2, naming the argument (and the line); all before the model loads
    (--model here does not exist, and that error is not the one reported)."""
    _, da, db = two_adapters
    common = ["generate", "--model", str(tmp_path / "no-model")]
    ab = ["--reft", f"a={da}", "--reft", f"b={db}"]
    _bad(capsys, *common, "--reft", f"a={da}", "--reft", f"a={db}", "--prompt", "x",
         match=f"--reft a={db}: adapter 'a' is given twice")
    _bad(capsys, *common, "--reft", str(da), "--reft", str(db), "--prompt", "x",
         match=f"--reft {db}: adapter 'default' is given twice")
    _bad(capsys, *common, "--reft", f"default={da}", "--reft", str(db), "--prompt", "x",
         match="adapter 'default' is given twice")
    for name in ("bad.name", "a b", "", "keys"):
        _bad(capsys, *common, "--reft", f"{name}={da}", "--prompt", "x",
             match=f"--reft {name}={da}: bad adapter name {name!r}")
    _bad(capsys, *common, "--reft", f"base={da}", "--prompt", "x", match="reserved")
    _bad(capsys, *common, "--reft", f"a={tmp_path}", "--prompt", "x",
         match=f"--reft a={tmp_path}: not a reft_ext checkpoint directory")
    (tmp_path / "reft_adapters.json").write_text("{}")  # a reft_ext.save_adapters directory
    _bad(capsys, *common, "--reft", str(tmp_path), "--prompt", "x",
         match=f"pass --reft NAME={tmp_path / 'NAME'} for each")
    _bad(capsys, *common, *ab, "--adapter", "c", "--prompt", "x",
         match="--adapter c: no --reft adapter")
    _bad(capsys, *common, *ab, match="no prompts: give --prompt TEXT or --prompts FILE")
    f = tmp_path / "p.jsonl"
    _bad(capsys, *common, *ab, "--prompts", str(f), match=f"--prompts {f}: no such file")
    good = '{"prompt": "len", "adapter": "a"}\n\n'
    for line, match in [
        ("{not json", ":3: not valid JSON"),
        ("[1, 2]", ":3: expected a JSON object"),
        ('{"adapter": "a"}', ':3: "prompt" must be a non-empty string'),
        ('{"prompt": 3}', ':3: "prompt" must be a non-empty string'),
        ('{"prompt": "x", "adapter": 3}', ':3: "adapter" must be an adapter name or null'),
        ('{"prompt": "x", "adapter": "c"}', ":3: unknown adapter 'c'"),
    ]:
        f.write_text(good + line + "\n" + good)
        _bad(capsys, *common, *ab, "--prompts", str(f), match=f"--prompts {f}{match}")
    f.write_text("\n\n")
    _bad(capsys, *common, *ab, "--prompts", str(f), match=f"--prompts {f}: no prompts")


def test_generate_named_other_models_checkpoint_says_pass_model(capsys, two_adapters):
    _, da, db = two_adapters  # tiny-model checkpoints under the built-in model
    line = _bad(capsys, "generate", "--reft", f"a={da}", "--reft", f"b={db}", "--prompt", "x",
                match=f"--reft a={da}: ")
    assert "pass --model DIR" in line


def test_generate_help_shows_adapters(capsys):
    rc, out, _ = _run(capsys, "generate", "--help")
    assert rc == 0
    flat = " ".join(out.split())
    for s in ("--reft [NAME=]DIR", "--prompts FILE", "--adapter NAME", "[base]",
              "named 'default'"):
        assert s in flat, (s, out)
    assert max(map(len, out.splitlines())) <= 100
