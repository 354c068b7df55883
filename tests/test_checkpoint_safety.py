"""Checkpoints of a run folder never run code on load, and resume survives what a kill or a
stray file leaves: a corrupt newest checkpoint, a torn metrics line, a moved folder."""

import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from _stacklevel import record_callers

from odeify.train.checkpoints import _OLD_FORMAT_GLOBALS, Checkpoints, claim
from odeify.train.config import config_stamp
from odeify.train.metrics import Metrics


def _trained():
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns torch.load's weights_only default off in a user's
# environment; odeify asks for weights_only explicitly, so it still unpickles nothing.
@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "unsafe-env"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, monkeypatch, force_unsafe):
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model, optimizer, _ = _trained()
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"step": 999, "config": {}, "model": _Payload(marker)}, folder / "step-999.pt")
    for call in (
        lambda c: c.check(),
        lambda c: c.resume(model, optimizer),
    ):
        with pytest.raises(ValueError, match="never unpickles"):
            call(Checkpoints(folder, {}))
    assert not marker.exists()


def test_a_checkpoint_of_exactly_step_config_and_model_is_one(tmp_path):
    # The three keys every recipe's checkpoint has; optimizer and RNG states are read only by
    # resume, so check takes a file holding just these.
    torch.save({"step": 7, "config": {"lr": 0.1}, "model": {}}, tmp_path / "step-7.pt")
    assert Checkpoints(tmp_path, {"lr": 0.1}).check() == 7
    torch.save({"step": 8, "config": {"lr": 0.1}}, tmp_path / "step-8.pt")
    with pytest.warns(UserWarning, match="step-8.pt is not a checkpoint written by odeify"):
        assert Checkpoints(tmp_path, {"lr": 0.1}).check() == 7


def test_checkpoints_hold_only_tensors_and_plain_data(tmp_path):
    model, optimizer, scheduler = _trained()
    path = Checkpoints(tmp_path, {"lr": 0.1, "sizes": (1, 2)}).save(1, model, optimizer, scheduler)
    torch.load(path, weights_only=True)  # what any reader can do safely
    expected = random.random(), np.random.rand(), torch.rand(1)
    Checkpoints(tmp_path, {"lr": 0.1, "sizes": (1, 2)}).resume(*_trained())
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_checkpoints_of_the_previous_format_still_resume(tmp_path):
    model, optimizer, scheduler = _trained()
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    state = {
        "step": 4,
        "config": {"lr": 0.1, "out_dir": "/somewhere/else"},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "extra": {"tokens_seen": 40},
    }
    torch.save(state, tmp_path / "step-4.pt")
    expected = np.random.rand()
    assert Checkpoints(tmp_path, {"lr": 0.1}).resume(*_trained()) == (4, {"tokens_seen": 40})
    assert np.random.rand() == expected


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    model, optimizer, _ = _trained()
    ckpt = Checkpoints(tmp_path, {"lr": 0.1}, keep=2)
    ckpt.save(1, model, optimizer)
    newest = ckpt.save(2, model, optimizer)
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match="resuming from step-1.pt.*step-2.pt is not a readable"):
        assert ckpt.check() == 1
    with pytest.warns(UserWarning, match="step-1.pt"):
        assert ckpt.resume(model, optimizer)[0] == 1


@pytest.mark.parametrize(
    "name, content, match",
    [("step-5.pt", b"", "step-5.pt is empty"), ("step-5.pt", b"junk", "not a readable checkpoint")],
)
def test_an_empty_or_stray_checkpoint_is_named(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(
        ValueError, match=f"no checkpoint in .* can be read: .*{match}.*Start the run again"
    ):
        Checkpoints(tmp_path, {}).check()


def test_files_not_named_like_checkpoints_are_ignored(tmp_path):
    model, optimizer, _ = _trained()
    (tmp_path / "step-best.pt").write_bytes(b"mine")
    Checkpoints(tmp_path, {"lr": 0.1}).save(3, model, optimizer)
    assert Checkpoints(tmp_path, {"lr": 0.1}).check() == 3


def test_a_moved_run_folder_resumes(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Config:
        lr: float = 0.1
        out_dir: str = "runs/a"

    model, optimizer, _ = _trained()
    Checkpoints(tmp_path / "a", config_stamp(Config())).save(2, model, optimizer)
    os.rename(tmp_path / "a", tmp_path / "b")
    moved = Checkpoints(tmp_path / "b", config_stamp(Config(out_dir=str(tmp_path / "b"))))
    assert claim(moved, tmp_path / "b" / "metrics.jsonl", resume=True) == 2


def test_a_torn_line_mid_character_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "note": "caf\xc3\xa9"}\n{"step": 2, "note": "caf\xc3')
    metrics = Metrics(path)
    assert [r["step"] for r in metrics.read()] == [1]
    path.write_bytes(b'{"step": 1}\n12')  # a torn record that parses as a number
    metrics.resume(1)
    assert path.read_text() == '{"step": 1}\n'
    assert pickle.dumps(metrics.read())


def test_finished_returns_the_summary_of_a_finished_run_on_resume_only(tmp_path, capsys):
    from odeify.train.checkpoints import finished

    ckpt, summary = Checkpoints(tmp_path / "checkpoints", {"lr": 0.1}), tmp_path / "summary.json"
    assert finished(ckpt, summary, resume=True) is None  # not finished
    model, optimizer, _ = _trained()
    ckpt.save(3, model, optimizer)
    summary.write_text('{"loss": 2.5}')
    assert finished(ckpt, summary, resume=False) is None  # a new run is claim's to refuse
    assert capsys.readouterr().err == ""
    assert finished(ckpt, str(summary), resume=True) == {"loss": 2.5}
    assert capsys.readouterr().err == (
        f"{tmp_path} holds a finished run: nothing to resume ({summary})\n"
    )
    # A finished run of another config is refused, not returned.
    other = Checkpoints(tmp_path / "checkpoints", {"lr": 0.2})
    refusal = (
        f"{tmp_path / 'checkpoints' / 'step-3.pt'} was written under another config (differs in "
        "['lr']); resume with the same config or start a new run folder"
    )
    with pytest.raises(ValueError) as raised:
        finished(other, summary, resume=True)
    assert str(raised.value) == refusal
    with pytest.raises(ValueError) as raised:  # resuming it is refused alike
        other.resume(model, optimizer)
    assert str(raised.value) == refusal


@pytest.mark.parametrize("left", ["metrics", "checkpoint"])
def test_claim_refuses_a_folder_holding_either_part_of_a_run(tmp_path, left):
    ckpt, metrics = Checkpoints(tmp_path / "checkpoints", {"lr": 0.1}), tmp_path / "metrics.jsonl"
    if left == "metrics":
        Metrics(metrics).log(step=1)
    else:
        model, optimizer, _ = _trained()
        ckpt.save(1, model, optimizer)
    with pytest.raises(FileExistsError) as raised:
        claim(ckpt, metrics, resume=False)
    assert str(raised.value) == (
        f"{tmp_path} already holds a run; pass --resume to continue it or choose another out_dir"
    )
    assert claim(ckpt, metrics, resume=True) == (0 if left == "metrics" else 1)


def test_resume_restores_a_scheduler_only_when_both_sides_have_one(tmp_path):
    model, optimizer, scheduler = _trained()
    with_scheduler = Checkpoints(tmp_path / "a", {"lr": 0.1})
    with_scheduler.save(1, model, optimizer, scheduler)
    without = Checkpoints(tmp_path / "b", {"lr": 0.1})
    without.save(1, model, optimizer)
    assert with_scheduler.resume(model, optimizer) == (1, {})  # no scheduler to restore into
    fresh = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert without.resume(model, optimizer, fresh) == (1, {})  # none saved: left as it was
    assert fresh.last_epoch == 0
    assert with_scheduler.resume(model, optimizer, fresh) == (1, {})
    assert fresh.last_epoch == scheduler.last_epoch == 1


def test_trainable_only_resume_names_the_first_four_differing_tensors(tmp_path):
    saved = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(4)))  # 6 differ
    ckpt = Checkpoints(tmp_path, {"lr": 0.1}, trainable_only=True)
    ckpt.save(1, saved, torch.optim.SGD(saved.parameters(), lr=0.1))
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError) as raised:
        ckpt.resume(other, torch.optim.SGD(other.parameters(), lr=0.1))
    assert str(raised.value) == (
        f"{tmp_path / 'step-1.pt'} holds other trainable tensors than this model "
        "(['1.bias', '1.weight', '2.bias', '2.weight'] differ)"
    )


def test_a_checkpoint_names_its_format(tmp_path):
    # The version is what tells a reader this layout (NumPy's keys as a tensor) from format 1's.
    model, optimizer, _ = _trained()
    path = Checkpoints(tmp_path, {"lr": 0.1}).save(1, model, optimizer)
    state = torch.load(path, weights_only=True)
    assert state["format"] == 2 and state["rng"]["numpy"][1].dtype == torch.int64


def test_checkpoints_sort_by_step_and_keep_two_whole_models_by_default(tmp_path):
    model, optimizer, _ = _trained()
    model.bias.requires_grad_(False)  # kept anyway: trainable_only is off by default
    ckpt = Checkpoints(tmp_path, {"lr": 0.1})
    for step in (9, 10, 2):  # numerically, not as strings (10 < 2 < 9)
        ckpt.save(step, model, optimizer)
    (tmp_path / "step-x.pt").write_bytes(b"")  # not a step number: ignored
    assert [p.name for p in ckpt.paths()] == ["step-9.pt", "step-10.pt"]
    state = torch.load(ckpt.paths()[-1], weights_only=True)
    assert set(state["model"]) == {"weight", "bias"}


def test_another_config_names_exactly_the_keys_that_differ(tmp_path):
    model, optimizer, _ = _trained()
    Checkpoints(tmp_path, {"lr": 0.1, "steps": 3}).save(1, model, optimizer)
    # lr equal on both sides; steps only in the saved config, seed only in this one.
    with pytest.raises(ValueError) as raised:
        Checkpoints(tmp_path, {"lr": 0.1, "seed": 1}).check()
    assert str(raised.value) == (
        f"{tmp_path / 'step-1.pt'} was written under another config (differs in ['seed', "
        "'steps']); resume with the same config or start a new run folder"
    )


def test_every_unreadable_checkpoint_is_named_in_full(tmp_path):
    model, optimizer, _ = _trained()
    ckpt = Checkpoints(tmp_path, {"lr": 0.1}, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, model, optimizer)
    empty = [tmp_path / f"step-{step}.pt" for step in (3, 2, 1)]
    for path in empty[:2]:
        path.write_bytes(b"")
    why = [f"{path} is empty (a save killed before it began writing?)" for path in empty]
    with pytest.warns(UserWarning) as warned:
        assert ckpt.check() == 1
    assert str(warned[0].message) == (
        f"resuming from step-1.pt, the newest readable checkpoint: {why[0]}; {why[1]}"
    )
    empty[2].write_bytes(b"")
    with pytest.raises(ValueError) as raised:
        ckpt.check()
    assert str(raised.value) == (
        f"no checkpoint in {tmp_path} can be read: {'; '.join(why)}. Start the run again "
        "(without --resume, or in another out_dir)"
    )


def _torch_error(path, **kwargs):
    """What torch.load itself says about a file (the text odeify's refusals pass on)."""
    with pytest.raises(Exception) as raised, torch.serialization.safe_globals(_OLD_FORMAT_GLOBALS):
        torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    return raised.value


def _write(path, kind):
    if kind == "junk":
        path.write_bytes(b"junk")
    elif kind == "one byte":
        path.write_bytes(b"\x80")
    elif kind == "truncated zip":
        torch.save({"step": 1, "config": {}, "model": {}}, path)
        path.write_bytes(path.read_bytes()[:-10])
    elif kind == "truncated pickle":  # the pre-zip format ends early: EOFError, no text
        torch.save(
            {"step": 1, "config": {}, "model": {}}, path, _use_new_zipfile_serialization=False
        )
        path.write_bytes(path.read_bytes()[:20])
    elif kind == "folder":
        path.mkdir()
    elif kind == "list":
        torch.save([1, 2], path)
    elif kind == "no model":
        torch.save({"step": 1, "config": {}, "optimizer": {}}, path)
    elif kind == "crafted":
        torch.save({"step": 1, "config": {}, "model": _Payload(path.parent / "pwned")}, path)


@pytest.mark.parametrize(
    "kind",
    [
        "junk",
        "one byte",
        "truncated zip",
        "truncated pickle",
        "folder",
        "list",
        "no model",
        "crafted",
    ],
)
def test_each_unreadable_file_is_refused_with_its_reason_in_full(tmp_path, kind):
    path = tmp_path / "step-3.pt"
    _write(path, kind)
    # check() memory-maps the file (torch then refuses anything but its zip format), resume()
    # reads it: each passes on what torch.load said in that mode.
    for call, mmap in ((lambda c: c.check(), True), (lambda c: c.resume(*_trained()[:2]), False)):
        if kind in ("list", "no model"):
            why = f"{path} is not a checkpoint written by odeify's recipes"
        elif kind == "crafted":
            first = str(_torch_error(path, mmap=mmap)).splitlines()[0]
            why = (
                f"{path} holds objects other than tensors and plain data, which odeify never "
                f"unpickles (crafted, or not written by odeify): {first}"
            )
        else:
            error = _torch_error(path, mmap=mmap)
            assert not isinstance(error, pickle.UnpicklingError)
            why = f"{path} is not a readable checkpoint (truncated or corrupt: {error})"
        message = (
            f"no checkpoint in {tmp_path} can be read: {why}. Start the run again (without "
            "--resume, or in another out_dir)"
        )
        with pytest.raises(ValueError) as raised:
            call(Checkpoints(tmp_path, {}))
        assert str(raised.value) == message, mmap
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [b"\x80", b"junk"])
def test_resume_falls_back_past_a_newest_file_of_a_few_bytes(tmp_path, content):
    # torch.load raises IndexError (1 byte) or struct.error (a few) on these; resume let them
    # through instead of skipping the file.
    model, optimizer, _ = _trained()
    ckpt = Checkpoints(tmp_path, {"lr": 0.1}, keep=2)
    ckpt.save(1, model, optimizer)
    ckpt.save(2, model, optimizer).write_bytes(content)
    with pytest.warns(
        UserWarning, match="^resuming from step-1.pt, the newest readable checkpoint: "
    ):
        assert ckpt.resume(model, optimizer)[0] == 1


def test_check_maps_the_file_and_resume_reads_it(tmp_path, monkeypatch):
    model, optimizer, _ = _trained()
    Checkpoints(tmp_path, {"lr": 0.1}).save(2, model, optimizer)
    loads, load = [], torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: loads.append((k["mmap"], k["map_location"])) or load(*a, **k)
    )
    assert Checkpoints(tmp_path, {"lr": 0.1}).check() == 2
    assert Checkpoints(tmp_path, {"lr": 0.1}).resume(model, optimizer)[0] == 2
    assert loads == [(True, "cpu"), (False, "cpu")]


def test_the_fallback_warning_names_the_caller_of_check_and_resume(tmp_path, monkeypatch):
    # The frame a warning names is found by walking up from the function that warns (two
    # frames: past _newest, to whoever called check or resume), so the check holds however
    # the methods are reached (mutmut calls them through wrappers).
    model, optimizer, _ = _trained()
    ckpt = Checkpoints(tmp_path, {"lr": 0.1}, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, model, optimizer)
    for step in (2, 3):
        (tmp_path / f"step-{step}.pt").write_bytes(b"")
    callers = record_callers(monkeypatch, 3)  # 1: _newest, 2: check or resume, 3: their caller
    why = [
        f"{tmp_path / f'step-{step}.pt'} is empty (a save killed before it began writing?)"
        for step in (3, 2)
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.check() == 1
        assert ckpt.resume(model, optimizer)[0] == 1
    assert [(w.filename, w.lineno) for w in caught] == callers and len(callers) == 2
    expected = f"resuming from step-1.pt, the newest readable checkpoint: {why[0]}; {why[1]}"
    assert [(w.category, str(w.message)) for w in caught] == [(UserWarning, expected)] * 2
