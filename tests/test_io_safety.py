"""Saving never loses a model or deletes what odeify did not write; a saved folder that
contradicts itself (edited config, flipped bits) is refused on load."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from odeify import atomic, from_pretrained, odeify, save_pretrained
from odeify.atomic import atomic_file, replace_folder, write_text
from odeify.io import tensor_checksum

IDS = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model(make_gpt2):
    return odeify(make_gpt2(), progress=False)


def test_working_directory_and_its_parents_are_refused(model, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in (".", "..", str(work)):
        with pytest.raises(FileExistsError, match="working directory"):
            save_pretrained(model, target, overwrite=True)
    assert (work / "notes.txt").read_text() == "mine"


def test_overwriting_a_checkpoint_keeps_no_leftovers(model, tmp_path):
    save_pretrained(model, tmp_path / "m")
    save_pretrained(model, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert from_pretrained(tmp_path / "m") is not None


def test_a_failed_save_keeps_the_old_model(model, tmp_path):
    save_pretrained(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with (
        pytest.raises(RuntimeError, match="disk full"),
        replace_folder(tmp_path / "m", overwrite=True) as tmp,
    ):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


_KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import odeify.atomic as atomic
stage = sys.argv[2]
real_rename = Path.rename
def rename(self, target):
    if stage == "between" and Path(target).name == Path(sys.argv[1]).name and "odeify-tmp" in self.name:
        os.kill(os.getpid(), signal.SIGKILL)  # the old model set aside, the new one not yet in
    return real_rename(self, target)
Path.rename = rename
real_exchange = atomic._exchange
def exchange(a, b):
    if stage == "between":
        return False  # the fallback of two renames, where the system has no RENAME_EXCHANGE
    swapped = real_exchange(a, b)
    if stage == "exchanged":
        os.kill(os.getpid(), signal.SIGKILL)  # the new model in, the old one not yet deleted
    return swapped
atomic._exchange = exchange
with atomic.replace_folder(sys.argv[1], overwrite=True) as tmp:
    (tmp / "config.json").write_text('{"new": true}')
    if stage == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("stage", ["writing", "between", "exchanged"])
def test_a_killed_save_leaves_a_model_and_the_next_save_cleans_up(tmp_path, stage):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(_KILLED_SAVE))
    run = subprocess.run([sys.executable, str(script), str(target), stage])
    assert run.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".m.odeify-*"))) >= 1  # what the killed save left
    with replace_folder(target, overwrite=True) as tmp:
        # The old model is back in place (or was never moved), or the new one is complete,
        # before the next write starts.
        expected = {"new": True} if stage == "exchanged" else {"old": True}
        assert json.loads((target / "config.json").read_text()) == expected
        (tmp / "config.json").write_text('{"newer": true}')
    assert json.loads((target / "config.json").read_text()) == {"newer": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kill.py", "m"]


def test_write_text_replaces_whole_files_only(tmp_path):
    target = tmp_path / "summary.json"
    write_text(target, "old")
    with pytest.raises(OSError, match="disk full"), atomic_file(target) as f:
        f.write("half")
        raise OSError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.fixture
def saved(model, tmp_path):
    save_pretrained(model, tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda c: c["odeify"].update(basis="chebyshev"),
            "basis 'chebyshev' \\(saved with 'hat'\\)",
        ),
        (lambda c: c["odeify"].update(num_layers=8), "describes 4 layers.*num_layers = 8"),
        (lambda c: c.update(odeify="x"), "must be a mapping"),
        (lambda c: c["odeify"].pop("num_layers"), "incomplete 'odeify' section"),
        (lambda c: c["odeify"].update(family="llama"), "family 'llama'"),
    ],
)
def test_a_config_that_contradicts_its_tensors_is_refused(saved, edit, match):
    _edit_config(saved, edit)
    with pytest.raises(ValueError, match=match):
        from_pretrained(saved)


def test_a_changed_tensor_fails_the_checksum(saved):
    state = load_file(saved / "model.safetensors")
    name = next(k for k in state if ".basis." in k)
    state[name].view(torch.int32).view(-1)[0] ^= 1 << 30  # one flipped bit
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    refusal = (
        f"{saved}: the tensors do not match the checksum written with them (the weight files "
        "were changed or corrupted); pass verify=False to load them anyway"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(refusal)}$"):
        from_pretrained(saved)
    assert from_pretrained(saved, verify=False) is not None


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"fitted_with": {}}'])
def test_a_checksum_file_that_is_not_one_is_refused(saved, text):
    (saved / "checksum.json").write_text(text)
    refusal = f"{saved / 'checksum.json'} is not a checksum file written by odeify"
    with pytest.raises(ValueError, match=f"^{re.escape(refusal)}$"):
        from_pretrained(saved)


def test_folders_saved_without_a_checksum_still_load(saved, model):
    (saved / "checksum.json").unlink()
    with torch.no_grad():
        assert torch.equal(from_pretrained(saved)(IDS).logits, model.eval()(IDS).logits)


def test_basis_edit_without_a_checksum_file_is_caught_by_shapes(saved):
    (saved / "checksum.json").unlink()
    _edit_config(saved, lambda c: c["odeify"].update(basis="fourier", num_basis=3))
    with pytest.raises(ValueError, match="does not match"):
        from_pretrained(saved)


def test_without_a_checksum_file_the_tensors_name_what_was_edited(saved):
    (saved / "checksum.json").unlink()
    _edit_config(saved, lambda c: c["odeify"].update(num_basis=3))
    with pytest.raises(ValueError) as error:
        from_pretrained(saved)
    head = f"{saved} does not match its config (basis kind, num_basis or model size edited?): "
    message = str(error.value)
    assert message.startswith(head)
    # The first four tensors of the wrong shape, in the file's (name) order.
    assert message.removeprefix(head).split("; ") == [
        "transformer.h.0.basis.attn.c_attn.bias (4, 96) (config implies (3, 96))",
        "transformer.h.0.basis.attn.c_attn.weight (4, 96, 32) (config implies (3, 96, 32))",
        "transformer.h.0.basis.attn.c_proj.bias (4, 32) (config implies (3, 32))",
        "transformer.h.0.basis.attn.c_proj.weight (4, 32, 32) (config implies (3, 32, 32))",
    ]
    _edit_config(saved, lambda c: c["odeify"].update(num_basis=4, family="llama"))
    family = (
        f"{saved}: config.json describes a gpt2 model but its odeify section says family 'llama'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(family)}$"):
        from_pretrained(saved)


def test_a_stock_folder_whose_config_claims_odeify_is_refused(make_gpt2, tmp_path):
    stock = make_gpt2()
    odeify_settings = odeify(make_gpt2(), progress=False).config.odeify
    stock.config.odeify = odeify_settings  # e.g. a config object shared with an odeified model
    stock.save_pretrained(tmp_path / "stock")
    message = (
        f"{tmp_path / 'stock'}: config.json has an odeify section but the weights are a stock "
        "model's (no basis tensors); load it with AutoModelForCausalLM.from_pretrained, or delete "
        "the odeify section from config.json"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        from_pretrained(tmp_path / "stock")


def test_an_overwrite_swaps_the_folders_in_one_step(tmp_path, monkeypatch):
    # Where the system can exchange two paths, no instant has the path empty: no rename of the
    # old folder aside happens at all.
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    if not atomic._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no atomic exchange of paths on this system")
    (tmp_path / "a").rmdir(), (tmp_path / "b").rmdir()
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')
    renames = []
    real_rename = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, t: renames.append(t) or real_rename(self, t))
    with replace_folder(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text('{"new": true}')
    assert renames == [] and json.loads((target / "config.json").read_text()) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("suffix", ["ln_f.weight", "basis.attn.c_attn.weight"])
def test_a_weight_file_missing_a_tensor_is_refused(saved, suffix):
    state = load_file(saved / "model.safetensors")
    (name,) = [k for k in state if k.endswith(suffix)]
    del state[name]
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    # verify=False: past the checksum, so the check of the tensors against the model refuses it.
    with pytest.raises(ValueError, match=rf"missing \['{re.escape(name)}'\]"):
        from_pretrained(saved, verify=False)


def _fitted_with_refusal(folder, pairs):
    return re.escape(
        f"{folder}/config.json does not match the tensors saved with it: {pairs}; restore the "
        "config or convert the model again"
    )


def _more_layers(config):
    # Both layer counts edited alike, so only the settings saved beside the tensors can tell.
    config["n_layer"] = config["odeify"]["num_layers"] = 8


@pytest.mark.parametrize(
    "edit, pairs",
    [
        (lambda c: c["odeify"].update(family="llama"), "family 'llama' (saved with 'gpt2')"),
        (_more_layers, "num_layers 8 (saved with 4)"),
        (lambda c: c["odeify"].update(num_basis=3), "num_basis 3 (saved with 4)"),
        (
            lambda c: c["odeify"].update(basis_kwargs={"scale": 2}),
            "basis_kwargs {'scale': 2} (saved with {})",
        ),
        (
            lambda c: c["odeify"].update(basis="chebyshev", num_basis=3),
            "basis 'chebyshev' (saved with 'hat'), num_basis 3 (saved with 4)",
        ),
    ],
)
def test_every_setting_saved_with_the_tensors_is_checked(saved, edit, pairs):
    # Each of these would also fail later (shapes, family) or load wrong weights silently; the
    # settings saved beside the checksum name what was edited, before any tensor is read.
    _edit_config(saved, edit)
    with pytest.raises(ValueError, match=f"^{_fitted_with_refusal(saved, pairs)}$"):
        from_pretrained(saved)


def test_a_checksum_without_settings_still_loads(saved, model):
    # checksum.json written before it held the fitting settings: the tensors are still verified.
    path = saved / "checksum.json"
    checksum = json.loads(path.read_text())
    del checksum["fitted_with"]
    path.write_text(json.dumps(checksum))
    with torch.no_grad():
        assert torch.equal(from_pretrained(saved)(IDS).logits, model.eval()(IDS).logits)


def test_tensor_checksum_is_sha256_of_names_dtypes_shapes_and_bytes():
    # The digest is a file format (folders saved by one odeify verify under another): computed
    # here independently from its definition, in name order, of the tensors made contiguous.
    b = torch.arange(3, dtype=torch.int16)
    a = torch.arange(4, dtype=torch.bfloat16).reshape(2, 2).t()  # not contiguous
    expected = hashlib.sha256()
    for name, t in (("a", a), ("b", b)):
        expected.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        expected.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert tensor_checksum({"b": b, "a": a}) == expected.hexdigest()
    assert tensor_checksum({"w": torch.zeros(2)}) == (
        "1b4484e4be5f2a83d6be61d9cbd45af77756aeb6210473c2dae0c801cbfc4b0f"
    )
