"""Every ```python block of README.md is run here, read from README.md at test time, so
the README cannot drift from the code.

The one substitution: the README's examples load hub models, and CI has no hub. SUBSTITUTE
(below) maps each such string in the README's code to a local stand-in that the test builds
in its working directory; nothing else of a block is changed. The stand-in for
Llama-3.2-1B-Instruct is a random Llama with that model's 16 decoder layers (d=32), so the
README's layer indices are used as written, and an offline byte-level tokenizer
(tests/_integration_util.py).

Each entry of RUNS is one script, executed in a fresh namespace in a fresh working
directory: README blocks, named by the heading of their section and their index under it,
in the order listed and concatenated (a block that continues an earlier example runs
after it: DPO after SFT, "accelerate" after the Trainer example), with test code (plain
strings) between them. Test code only defines what the README leaves to the reader (the
`model`, `batch`, `pos` of a snippet) or checks what a block claims, and says which.

The two blocks that show examples/ddp.py and examples/fsdp2.py need torchrun: here they
must equal the file (ddp.py) or a contiguous run of its lines (fsdp2.py), and
tests/test_examples.py runs the files. test_every_python_block_is_run fails on a block
that neither RUNS nor EXAMPLE_FILES claims, so a new block cannot go unrun.

The TRL, bitsandbytes and PEFT blocks need the trl, quant and peft extras: they run in
test_readme_integration_block, which skips without them in the README's test command and
runs in the integrations step of .ci/run, as tests/test_integration_*.py do.
"""
from __future__ import annotations

import linecache
from pathlib import Path

import pytest
import torch

# README string -> the local stand-in the test builds under that name (see module docstring)
SUBSTITUTE = {
    "meta-llama/Llama-3.2-1B-Instruct": "tiny-llama-16-layers",
    "path/to/pyreft_save": "pyreft-save",        # a pyreft save at layers 4 and 8 of it
}

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HUB_NAME = "meta-llama/Llama-3.2-1B-Instruct"


def readme_blocks() -> dict[tuple[str, int], str]:
    """{(heading of the section, index of the block in it): source} of every ```python
    block of README.md."""
    blocks, heading, counts, fence = {}, None, {}, None
    for line in README.read_text().splitlines(keepends=True):
        if fence is None:
            if line.startswith("```"):
                fence = line[3:].strip()
                src = []
                if fence == "python":
                    i = counts[heading] = counts.get(heading, -1) + 1
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            if fence == "python":
                blocks[(heading, i)] = "".join(src)
            fence = None
        else:
            src.append(line)
    return blocks


class B:
    """A README block in a run: the i-th ```python block under the heading."""

    def __init__(self, heading: str, i: int = 0):
        self.key = (heading, i)


# --- test code used by several runs ---------------------------------------------------------

GIVEN_MODEL = f"""
# given: the imports and the (unpatched) model the snippet below assumes
import torch
import reft_ext
from transformers import AutoModelForCausalLM
name = "{HUB_NAME}"
model = AutoModelForCausalLM.from_pretrained(name)
"""

CHECK_LAYERS_4_8_12 = """
# check: the snippet patched the layers it names
assert sorted(reft_ext.interventions(model)) == [4, 8, 12]
"""

RUNS = {
    "patch_and_other_controls": [
        GIVEN_MODEL, B("Training with `reft_ext.patch`"), CHECK_LAYERS_4_8_12,
        """
# given: a left-padded batch and explicit positions for "Other controls"
batch = {"input_ids": torch.randint(3, 200, (2, 12)),
         "attention_mask": torch.tensor([[0] * 3 + [1] * 9, [1] * 12])}
pos = torch.tensor([[3, 5, -1], [0, 1, 11]])
""",
        B("Other controls"),
        """
# check: the edit changed the logits, and unpatch removed it
assert not torch.equal(base_logits, logits)
assert not hasattr(model, "reft_interventions")
""",
    ],
    "positions_helpers": [
        """
# given: a batch of 3 rows of 20 tokens, right-padded, and its prompt lengths
import reft_ext
import torch
lengths = torch.tensor([20, 9, 4])
seq_len = 20
pad_counts = torch.zeros(3, dtype=torch.long)
attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
prompt_lengths = torch.tensor([12, 5, 2])
""",
        B("Positions"),
    ],
    "plain_training_loop": [
        B("Example: plain training loop"),
        """
# check: the trained part was saved (3 layers x R, W, b) and unpatch removed it
state = torch.load("reft.pt", weights_only=True)
assert len(state) == 9 and not hasattr(model, "reft_interventions")
""",
    ],
    "trainer_then_accelerate": [
        B("Example: Hugging Face Trainer"), B("accelerate"),
        """
# check: the accelerate run saved a checkpoint of the layers it patched
assert reft_ext.checkpoint.read_config("out/reft")["layers"] == [4, 8, 12]
""",
    ],
    "checkpoint_save_load_resume": [
        GIVEN_MODEL, B("Checkpoints and multi-process training"),
        """
# check: the reloaded model is the patched base, with the saved layers
assert model is base and sorted(reft_ext.interventions(model)) == [4, 8, 12]
# given: an optimizer that has taken a step (state to save) for "Resuming training exactly"
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
ids = torch.randint(3, 200, (2, 10))
model(input_ids=ids, labels=ids).loss.backward()
opt.step()
""",
        B("Resuming training exactly"),
        """
# check: load_optimizer restored the saved step's state into the new optimizer
assert all(s["step"] == 1 for s in opt.state_dict()["state"].values())
""",
    ],
    "trainer_checkpoint_callback": [
        GIVEN_MODEL, B("Training with `reft_ext.patch`"),
        """
# given: Trainer arguments that save every 2 steps, and a tokenized dataset
import transformers
args = transformers.TrainingArguments(output_dir="out", max_steps=4, save_steps=2,
                                      per_device_train_batch_size=2, report_to=[])
ds = [{"input_ids": list(range(3 + i, 13 + i)), "labels": list(range(3 + i, 13 + i))}
      for i in range(8)]
""",
        B("Hugging Face Trainer"),
        """
# check: every checkpoint-N/ got a reft/ that loads
for n in (2, 4):
    cfg = reft_ext.checkpoint.read_config(f"out/checkpoint-{n}/reft")
    assert cfg["layers"] == [4, 8, 12]
""",
    ],
    "pyreft_import": [
        f"""
# given: the base model the snippet imports into
import reft_ext
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("{HUB_NAME}")
""",
        B("Importing a pyreft checkpoint"),
        """
# check: the pyreft save's layers were patched
assert sorted(reft_ext.interventions(model)) == [4, 8]
""",
    ],
    "op": [
        """
# given: the op's arguments (B=2, T=6, d=16, r=4; -1 is an empty slot)
import torch
h = torch.randn(2, 6, 16)
positions = torch.tensor([[0, 5], [2, -1]])
R = torch.linalg.qr(torch.randn(16, 4))[0].T.contiguous()
W, b = torch.randn(4, 16), torch.randn(4)
h0 = h.clone()
""",
        B("The op"),
        """
# check: loreft left h0's values for loreft_ to edit in place, and both edited the same rows
assert torch.equal(out, h) and not torch.equal(h, h0)
assert torch.equal(h[0, 1:5], h0[0, 1:5])
# given: a bank of two interventions for the Banks block
Rs = torch.stack([R, torch.linalg.qr(torch.randn(16, 4))[0].T])
Ws, bs = torch.stack([W, torch.randn(4, 16)]), torch.stack([b, torch.randn(4)])
h = h0.clone()
""",
        B("Banks: several interventions in one call"),
        """
# check: each slot's row is the plain op's with that slot's entry; index -1 is not edited
one = reft_ext.loreft(h, torch.tensor([[0, -1], [-1, -1]]), Rs[0], Ws[0], bs[0])
two = reft_ext.loreft(h, torch.tensor([[-1, 5], [2, -1]]), Rs[1], Ws[1], bs[1])
assert torch.equal(out[0, 0], one[0, 0]) and torch.equal(out[0, 5], two[0, 5])
assert torch.equal(out[1, 2], two[1, 2]) and torch.equal(out[1, 0], h[1, 0])
""",
    ],
    "untied": [
        GIVEN_MODEL, B("Training with `reft_ext.patch`", 1),
        """
# check: two interventions on each named layer, #0 on the first and #1 on the last tokens
units = reft_ext.interventions(model)
assert sorted(units) == [1, 3] and all(len(u.members) == 2 for u in units.values())
ids = torch.randint(3, 200, (2, 12))
mask = torch.tensor([[0] * 3 + [1] * 9, [1] * 12])
pos = reft_ext.positions_from_mask("f5+l5", mask, tied=False)
assert pos[0].tolist() == [[3, 4, 5, 6, -1], [8, 9, 10, 11, -1]]   # 9 tokens: 4 each side
with torch.no_grad():
    edited = model(input_ids=ids, attention_mask=mask).logits
    with reft_ext.disabled(model):
        plain = model(input_ids=ids, attention_mask=mask).logits
assert not torch.equal(edited, plain)
""",
    ],
    "adapters": [
        B("Many adapters, one model"),
        """
# check: each row of the mixed batch is that row of a one-adapter batch, the None row the
# base model's; the reloaded adapters give the same mixed logits; generation used them
with torch.no_grad():
    for i, a in enumerate(rows):
        if a is None:
            with reft_ext.disabled(model):
                one = model(input_ids=input_ids, attention_mask=attention_mask).logits
        else:
            one = model(input_ids=input_ids, attention_mask=attention_mask,
                        reft_adapter=a).logits
        assert torch.equal(logits[i], one[i]), a
    again = fresh(input_ids=input_ids, attention_mask=attention_mask, reft_adapter=rows)
assert torch.equal(again.logits, logits)
assert list(reft_ext.adapters(fresh)) == ["sql", "chat", "style"]
assert out.shape == (4, T + 8)
""",
    ],
}

GIVEN_INTEGRATION = f"""
# given: what the Integrations blocks take from the examples above them
import torch
import reft_ext
from transformers import AutoModelForCausalLM
name = "{HUB_NAME}"
"""

INTEGRATION_RUNS = {
    "trl_sft_then_dpo": (("trl", "datasets"), [
        B("TRL: SFTTrainer"), B("TRL: DPOTrainer"),
        """
# check: the SFT run's reft_ext.save and its callback's checkpoint load
assert reft_ext.checkpoint.read_config("out/reft")["layers"] == [4, 8, 12]
assert reft_ext.checkpoint.read_config("out/checkpoint-25/reft")["layers"] == [4, 8, 12]
""",
    ]),
    "bitsandbytes": (("bitsandbytes",), [
        GIVEN_INTEGRATION, B("Quantised bases (bitsandbytes)", 0),
        B("Quantised bases (bitsandbytes)", 1),
        """
# check: a training step reaches every intervention through the 4-bit layers
ids = torch.randint(3, 200, (2, 12))
model.train()
model(input_ids=ids, labels=ids).loss.backward()
for i, m in reft_ext.interventions(model).items():
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, i
""",
    ]),
    "peft": (("peft",), [
        GIVEN_INTEGRATION, B("LoRA (PEFT) and ReFT on one model"),
        """
# check: both parts were saved by their own library
import os
assert os.path.isfile("out/lora/adapter_config.json")
assert reft_ext.checkpoint.read_config("out/reft")["layers"] == [4, 8]
""",
    ]),
}

# README blocks that show an example script (whole or a contiguous part); the file is run
# by tests/test_examples.py with torchrun
EXAMPLE_FILES = {
    ("Multi-process training (DDP, FSDP2)", 0): "examples/ddp.py",
    ("Multi-process training (DDP, FSDP2)", 1): "examples/fsdp2.py",
}


# --- the stand-ins --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """{SUBSTITUTE value: built directory}."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from _integration_util import byte_tokenizer, tiny_llama
    from test_pyreft_import import loreft_state, write_pyreft_dir

    root = tmp_path_factory.mktemp("readme_stand_ins")
    tok = byte_tokenizer()
    llama = root / SUBSTITUTE[HUB_NAME]
    tiny_llama(len(tok), hidden=32, layers=16).save_pretrained(llama)
    tok.save_pretrained(llama)
    pyreft = root / SUBSTITUTE["path/to/pyreft_save"]
    write_pyreft_dir(pyreft, [4, 8], [loreft_state(32, 4, seed)[0] for seed in (1, 2)],
                     rank=4, d=32)
    return {name: root / name for name in SUBSTITUTE.values()}


def _script(steps) -> str:
    blocks = readme_blocks()
    parts = []
    for step in steps:
        if isinstance(step, B):
            assert step.key in blocks, f"README.md has no python block {step.key}"
            parts.append(f"# --- README.md: {step.key[0]!r}, block {step.key[1]}\n")
            parts.append(blocks[step.key])
        else:
            parts.append(step)
    src = "\n".join(parts)
    for readme_name, local in SUBSTITUTE.items():
        src = src.replace(readme_name, local)
    return src


def _run(name, steps, stand_ins, tmp_path, monkeypatch):
    for local, path in stand_ins.items():
        (tmp_path / local).symlink_to(path)
    monkeypatch.chdir(tmp_path)                 # the blocks write out/, reft.pt, ...
    # a hub name the substitution missed fails at once instead of trying the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = _script(steps)
    filename = f"<README.md run {name}>"
    # tracebacks then show the failing README line
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    torch.manual_seed(0)                        # the test code's random inputs: same each run
    try:
        exec(compile(src, filename, "exec"), {"__name__": "__main__"})
    finally:
        linecache.cache.pop(filename, None)


# Trainer / TRL notices about this CPU-only run, not about the README's code
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning"),
    # TRL's configs turn gradient checkpointing on (and off around reference passes) through
    # the names transformers 5 deprecates
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_readme_block(name, stand_ins, tmp_path, monkeypatch):
    _run(name, RUNS[name], stand_ins, tmp_path, monkeypatch)


@pytest.mark.parametrize("name", sorted(INTEGRATION_RUNS))
def test_readme_integration_block(name, stand_ins, tmp_path, monkeypatch):
    needs, steps = INTEGRATION_RUNS[name]
    for module in needs:
        pytest.importorskip(module)
    _run(name, steps, stand_ins, tmp_path, monkeypatch)


def test_example_blocks_are_the_example_files():
    blocks = readme_blocks()
    for key, path in EXAMPLE_FILES.items():
        assert key in blocks, f"README.md has no python block {key}"
        text = (ROOT / path).read_text()
        if key[1] == 0:
            assert blocks[key] == text, f"{key}: not {path} as it is"
        else:
            assert blocks[key].strip() and "\n" + blocks[key] in "\n" + text, \
                f"{key}: not a contiguous part of {path}"
        # the command the README gives for it is there too
        assert f"torchrun --nproc_per_node=2 {path}" in README.read_text()


def test_every_python_block_is_run():
    used = {s.key for steps in RUNS.values() for s in steps if isinstance(s, B)}
    used |= {s.key for _, steps in INTEGRATION_RUNS.values() for s in steps
             if isinstance(s, B)}
    used |= set(EXAMPLE_FILES)
    blocks = set(readme_blocks())
    assert blocks - used == set(), "README python blocks that no test runs"
    assert used - blocks == set(), "blocks named here that README.md does not have"
    # the substitution is stated in the README, pointing here
    text = README.read_text()
    assert "tests/test_readme_blocks.py" in text and "SUBSTITUTE" in text
    for readme_name in SUBSTITUTE:
        assert readme_name in text, f"{readme_name!r} is no longer in the README"
