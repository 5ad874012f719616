"""Reliability and security: what an adapter's files may do, who owns an output folder, errors before work.

* Loading: `base_model_kwargs` is an allow-list of backbone-config overrides; remote code runs only when
  the caller passes `trust_remote_code=True`; loader errors name the file and field; non-finite tensors
  are refused by name.
* Output folders: one lock per folder (stale locks reported), no mixing of two runs, leftovers of a
  kill cleaned, `--resume` refused on a fingerprint mismatch naming the differing settings.
* The CLI: flags and overrides in any order; one `error: ...` line and exit code 2 for every error,
  before data or backbone are loaded where the recipe allows; the real entry point is run in a
  subprocess for the exit code / output contract (three runs, each a few seconds of imports).
* Divergence and data quirks are named: task, step, setting to lower, intact checkpoint; file paths.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hub_server import local_hub_server as local_hub_server  # noqa: F401  (registers the fixture)
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_assets import save_tiny_vit, torch_threads

from pgp_peft import PGPModel
from pgp_peft.config import PromptGradientProjectionConfig as Config
from pgp_peft.data import load_image_dataset, make_class_incremental_splits, verify_image_files
from pgp_peft.recipe import apply_overrides, available_recipes, load_recipe, validate_recipe
from pgp_peft.run_folder import (
    LOCK_NAME,
    OutputFolderLock,
    RunFolderError,
    fingerprint_differences,
    prepare_output_dir,
    run_fingerprint,
)
from pgp_peft.runner import build_datasets, check_hub_access, main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import tiny_cl  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with torch_threads(1):
        yield


def save_adapter(folder: Path, vit_dir: Path) -> Path:
    """A tiny L2P adapter whose recorded backbone is the saved tiny ViT in `vit_dir`."""
    config = Config.l2p(num_classes=4, pool_size=4, top_k=2, prompt_length=3)
    config = config.replace(base_model_name_or_path=str(vit_dir))
    torch.manual_seed(0)
    model = PGPModel(config, base_model=tiny_cl.tiny_backbone())
    model.register_task_classes(0, [0, 1, 2, 3])
    model.save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    payload = json.loads(path.read_text())
    payload.update(changes)
    path.write_text(json.dumps(payload))


# ----------------------------------------------------------------------------- loading an adapter
LOADER_KEYS = [
    "trust_remote_code",
    "code_revision",
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "device_map",
    "attn_implementation",
    "torch_dtype",
    "quantization_config",
]


@pytest.mark.parametrize("key", LOADER_KEYS)
def test_base_model_kwargs_refuse_loader_options(key):
    with pytest.raises(ValueError, match=rf"base_model_kwargs: \['{key}'\] refused"):
        Config.l2p(num_classes=4, base_model_kwargs={key: True})


def test_base_model_kwargs_accept_config_overrides_only():
    config = Config.l2p(num_classes=4, base_model_kwargs={"layer_norm_eps": 1e-6, "hidden_dropout_prob": 0.0})
    assert config.base_model_kwargs == {"layer_norm_eps": 1e-6, "hidden_dropout_prob": 0.0}
    with pytest.raises(ValueError, match="layer_norm_eps must be a finite non-negative number"):
        Config.l2p(num_classes=4, base_model_kwargs={"layer_norm_eps": "tiny"})
    config.base_model_kwargs["trust_remote_code"] = True  # mutated after construction: validate() re-checks
    with pytest.raises(ValueError, match="trust_remote_code"):
        config.validate()


def test_adapter_config_cannot_enable_remote_code(tmp_path):
    """A backbone repo with `auto_map` code: its Python runs only with the caller's trust_remote_code=True."""
    vit_dir = save_tiny_vit(tmp_path / "vit_with_code")
    marker = tmp_path / "remote_code_ran"
    (vit_dir / "evil_config.py").write_text(
        "from pathlib import Path\n"
        "from transformers import ViTConfig\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class EvilConfig(ViTConfig):\n"
        "    pass\n"
    )
    config_json = json.loads((vit_dir / "config.json").read_text())
    config_json["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (vit_dir / "config.json").write_text(json.dumps(config_json))
    adapter = save_adapter(tmp_path / "adapter", vit_dir)

    edit_config(adapter, base_model_kwargs={"trust_remote_code": True})
    with pytest.raises(ValueError, match=r"adapter/config.json: .*\['trust_remote_code'\] refused"):
        PGPModel.from_pretrained(adapter)
    edit_config(adapter, base_model_kwargs={"layer_norm_eps": 1e-6})
    loaded = PGPModel.from_pretrained(adapter)  # default: the recorded backbone, no remote code
    assert not marker.exists()
    assert loaded.backbone.model.config.layer_norm_eps == 1e-6
    PGPModel.from_pretrained(
        adapter, trust_remote_code=True
    )  # the caller's explicit opt-in reaches transformers
    assert marker.read_text() == "ran"


def test_loader_errors_name_the_file_and_field(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        FileNotFoundError, match="outputs/nothing: no such local folder, and no cached Hub copy"
    ):
        PGPModel.from_pretrained("outputs/nothing")  # a valid repo id form: looked up in the Hub cache
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        PGPModel.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        PGPModel.from_pretrained("./outputs/nothing/here")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        PGPModel.from_pretrained(tmp_path / "a_file")

    adapter = save_adapter(tmp_path / "adapter", tmp_path / "unused")
    good = (adapter / "config.json").read_text()
    (adapter / "config.json").write_text(good[:-20])
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        PGPModel.from_pretrained(adapter, base_model=tiny_cl.tiny_backbone())
    (adapter / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object .* got a JSON list"):
        PGPModel.from_pretrained(adapter, base_model=tiny_cl.tiny_backbone())
    (adapter / "config.json").write_text(good)
    edit_config(adapter, method="dualprompt", tuning_type="prefix", e_prompt_layers="2,3,4")
    with pytest.raises(ValueError, match=r"config.json: .*e_prompt_layers: expected a list of layer indices"):
        PGPModel.from_pretrained(adapter, base_model=tiny_cl.tiny_backbone())
    with pytest.raises(ValueError, match="class_names: expected a list of strings"):
        Config.l2p(num_classes=2, class_names="ab")


def test_non_finite_adapter_tensors_are_refused_by_name(tmp_path):
    adapter = save_adapter(tmp_path / "adapter", tmp_path / "unused")
    state = load_file(str(adapter / "model.safetensors"))
    name = next(
        key for key in state if "prompt" in key and state[key].is_floating_point() and state[key].numel()
    )
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(adapter / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model.safetensors: non-finite values .*\['{name}'\]"):
        PGPModel.from_pretrained(adapter, base_model=tiny_cl.tiny_backbone())


# ----------------------------------------------------------------------------- output folders
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_refuses_a_second_owner_and_reports_a_stale_lock(tmp_path, caplog):
    with OutputFolderLock(tmp_path):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {os.getpid()} on host"):
            OutputFolderLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released

    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    with caplog.at_level(logging.WARNING, logger="pgp_peft.run_folder"):
        lock = OutputFolderLock(tmp_path).acquire()
    assert f"stale lock of pid {pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()

    # Our pid, but a lock this process never took: left by an earlier process with the same pid.
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    OutputFolderLock(tmp_path).acquire().release()

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(
        RunFolderError, match=rf"cannot be checked from this host; .* delete {tmp_path / LOCK_NAME}"
    ):
        OutputFolderLock(tmp_path).acquire()


def test_output_folder_holding_another_run_is_refused_or_replaced(tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoint-task-3").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="holds another run .*--resume .*--overwrite_output_dir"):
        prepare_output_dir(out)
    assert not (out / LOCK_NAME).exists()  # a refused run leaves no lock behind
    prepare_output_dir(out, resume=True).release()
    with pytest.raises(RunFolderError, match="contradict"):
        prepare_output_dir(out, resume=True, overwrite=True)
    prepare_output_dir(out, overwrite=True).release()
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.txt"
    ]  # the old run's files are gone, not the user's

    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        prepare_output_dir(tmp_path / "file")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(RunFolderError, match="is read-only"):
        prepare_output_dir(out)


def test_staging_left_by_a_kill_is_cleaned_on_the_next_start(tmp_path, caplog):
    out = tmp_path / "run"
    leftovers = [
        out / ".pgp-staging.checkpoint-task-1.ab12cd34",
        out / ".pgp-staging.checkpoint-task-0.old",
        out / ".pgp-staging.baseline.x1y2z3w4",  # the baseline run's save_pretrained stages in out/
        out / "baseline" / ".pgp-staging.checkpoint-task-2.ab12cd34",
        tmp_path / ".pgp-staging.run.zz9_yy8x",  # save_pretrained(out) stages beside the folder
    ]
    for path in leftovers:
        (path / "sub").mkdir(parents=True)
    (out / ".pgp-staging.results.json.q1w2e3r4.tmp").write_text("{")
    (out / ".git").mkdir()  # not ours: kept
    (tmp_path / ".run.snapshot").mkdir()  # the user's, beside the folder: kept
    with caplog.at_level(logging.WARNING, logger="pgp_peft.run_folder"):
        prepare_output_dir(out).release()
    assert not any(path.exists() for path in leftovers)
    assert not (out / ".pgp-staging.results.json.q1w2e3r4.tmp").exists()
    assert (out / ".git").is_dir() and (tmp_path / ".run.snapshot").is_dir()
    assert "removed 6 staging item(s)" in caplog.text


def test_a_baseline_left_alone_is_a_run(tmp_path):
    """A run killed during its `compare_baseline` run leaves only baseline/: still another run's folder."""
    out = tmp_path / "run"
    (out / "baseline" / "checkpoint-task-0").mkdir(parents=True)
    (out / "baseline" / "checkpoint-task-0" / "continual_state.json").write_text("{}")
    with pytest.raises(RunFolderError, match="holds another run"):
        prepare_output_dir(out)
    prepare_output_dir(out, overwrite=True).release()
    assert not (out / "baseline").exists()


def test_fingerprint_names_the_differing_settings():
    recipe = load_recipe("demo")
    base = dict(
        adapter_config={"prompt_threshold": 0.97}, training={"learning_rate": 0.1}, manifest={}, seed=42
    )
    saved = run_fingerprint(recipe=recipe, **base)
    changed = apply_overrides(
        recipe, ["training.num_train_epochs=9", "hub.token=abc", "training.logging_steps=3"]
    )
    current = run_fingerprint(recipe=changed, **{**base, "seed": 7})
    assert fingerprint_differences(saved, current) == [
        f"recipe.training.num_train_epochs: {recipe['training']['num_train_epochs']} -> 9.0",
        "seed: 42 -> 7",
    ]
    assert not any("token" in key for key in saved)  # the hub section (and its token) is never stored


def test_training_arguments_fingerprint_holds_what_changes_the_numbers(tmp_path):
    """Resolved TrainingArguments: a spelled-out default is no difference, any field that changes the numbers
    is (also one not in FINGERPRINT_ARGUMENTS), and where the run logs or how fast data loads is not."""
    from pgp_peft.arguments import ContinualTrainingArguments as Args
    from pgp_peft.run_folder import training_arguments_fingerprint as fingerprint

    base = fingerprint(Args(output_dir=str(tmp_path / "a")))
    assert (
        fingerprint(Args(output_dir=str(tmp_path / "b"), weight_decay=0.0, seed=42, optim="adamw_torch"))
        == base
    )
    ignored = Args(output_dir=str(tmp_path / "c"), logging_steps=3, dataloader_num_workers=2, run_name="x")
    assert fingerprint(ignored) == base
    changed = fingerprint(
        Args(output_dir=str(tmp_path / "d"), dataloader_drop_last=True, train_sampling_strategy="sequential")
    )
    assert {key for key in changed if changed[key] != base.get(key)} == {
        "dataloader_drop_last",
        "train_sampling_strategy",
    }


def test_resume_refuses_another_run_and_overwrite_replaces_it(
    assets, tmp_path, capsys, restore_logging, fast_plots
):
    """Through main(): a finished run; a new run into it refused; --resume with other settings refused naming
    them; --resume with the same settings finishes at once; --overwrite_output_dir starts afresh."""
    out = tmp_path / "run"
    recipe = load_recipe("demo")
    args = ["--output_dir", str(out), *assets.overrides(recipe), "data.num_tasks=2"]
    assert main(args) == 0
    state = json.loads((out / "checkpoint-task-1" / "continual_state.json").read_text())
    assert state["fingerprint"]["training.num_train_epochs"] == 1 and state["fingerprint"]["seed"] == 42
    capsys.readouterr()

    assert main(args) == 2
    assert "holds another run" in capsys.readouterr().err
    assert main([*args, "--resume", "training.num_train_epochs=2", "adapter.prompt_threshold=0.9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines: one error line
    assert err.startswith("error: checkpoint ")
    assert "training.num_train_epochs: 1.0 -> 2.0" in err and "adapter.prompt_threshold: 0.97 -> 0.9" in err
    assert "recipe.training.num_train_epochs" not in state["fingerprint"]  # held as the resolved argument
    # Spelling out defaults (TrainingArguments' seed 42 and weight decay 0) is the same run.
    assert main([*args, "--resume", "--seed", "42", "training.weight_decay=0"]) == 0
    state_file = out / "checkpoint-task-1" / "continual_state.json"
    state = json.loads(state_file.read_text())
    state["fingerprint"]["pgp_peft_version"] = "0.1.0"
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    assert "was written by pgp_peft 0.1.0, this is " in capsys.readouterr().err
    (out / "checkpoint-task-1" / "marker").write_text("old run")
    assert main([*args, "--overwrite_output_dir"]) == 0
    assert not (out / "checkpoint-task-1" / "marker").exists() and not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- the CLI
def test_flags_and_overrides_in_any_order(monkeypatch, tmp_path, restore_logging):
    import pgp_peft.runner as runner

    calls = []
    monkeypatch.setattr(runner, "run_recipe", lambda recipe, output_dir, **kw: calls.append((recipe, kw)))
    monkeypatch.chdir(tmp_path)
    orders = [
        ["--no-pgp", "training.num_train_epochs=1", "data.num_tasks=2"],
        ["training.num_train_epochs=1", "--no-pgp", "data.num_tasks=2"],
        ["training.num_train_epochs=1", "--recipe", "demo", "data.num_tasks=2", "--no-pgp"],
        ["--training.num_train_epochs=1", "--no-pgp", "data.num_tasks=2", "--output_dir", "x"],
        ["num_train_epochs=1", "--training.seed=3", "data.num_tasks=2", "--no-pgp"],  # bare after --k=v
        ["data.num_tasks=2", "--resume", "training.num_train_epochs=1", "--no-pgp"],
        # HfArgumentParser's own form: `--key value`, with flags of the command in between
        ["--num_train_epochs", "1", "--no-pgp", "--num_tasks", "2"],
        ["--no-pgp", "--training.num_train_epochs", "1", "--resume", "data.num_tasks=2"],
    ]
    for argv in orders:
        assert main(argv) == 0, argv
        recipe, kwargs = calls[-1]
        assert recipe["training"]["num_train_epochs"] == 1 and recipe["data"]["num_tasks"] == 2, argv
        assert recipe["adapter"]["use_pgp"] is False, argv
    assert calls[-1][1]["resume"] is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.num_train_epochs=0", "training.num_train_epochs: must be a finite number > 0, got 0"),
        (
            "training.per_device_train_batch_size=0",
            "training.per_device_train_batch_size: must be a positive integer",
        ),
        ("training.base_lr=0", "training.base_lr: must be a finite number > 0, got 0"),
        ("training.base_lr=-1e-3", "training.base_lr: must be a finite number > 0"),
        (
            "training.optim=adamw_torh",
            "training.optim: unknown optimizer 'adamw_torh'; did you mean 'adamw_torch'",
        ),
        (
            "training.lr_scheduler_type=cosin",
            "training.lr_scheduler_type: unknown schedule 'cosin'; did you mean 'cosine'",
        ),
        ("training.learning_rate=0.001", "training.learning_rate and training.base_lr are both set"),
        ("training.base_lr=null", "training.base_lr or training.learning_rate: one of them must be set"),
        ("training.weight_decay=-1", "training.weight_decay: must be a finite number >= 0"),
        ("training.warmup_steps=-5", "training: Got warmup_steps = -5.0"),  # TrainingArguments' own check
        ("adapter.method=vpt", "adapter.method: unknown method 'vpt'"),
        ("adapter.top_k=20", "adapter.top_k: top_k=20 exceeds pool_size=10"),
        ("data.num_tasks=3", "data.num_tasks=3 does not divide the 10 classes"),
        ("data.classes_per_task=4", "needs 20 classes, but pgp_peft:fashion_mnist_demo has 10"),
        ("training.report_to=tensorbord", "training.report_to: unknown tracker(s) ['tensorbord']"),
        ("training.torch_threads=0", "training.torch_threads: must be a positive integer"),
        ("training.train_query_cache=true data.augment=true", "needs data.augment=false"),
    ],
)
def test_bad_recipe_values_fail_before_any_work(
    override, message, monkeypatch, tmp_path, capsys, restore_logging
):
    import pgp_peft.runner as runner

    def no_work(*args, **kwargs):
        raise AssertionError("data, backbone or output folder touched")

    monkeypatch.setattr(runner, "build_datasets", no_work)
    monkeypatch.setattr(runner, "prepare_output_dir", no_work)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_recipe(apply_overrides(load_recipe("demo"), override.split()))
    assert main(["--recipe", "demo", "--output_dir", str(tmp_path / "o"), *override.split()]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_the_imagefolder_class_count_is_checked_early(assets):
    recipe = apply_overrides(
        load_recipe("l2p_cifar100_10"), [*assets.overrides(load_recipe("l2p_cifar100_10"))]
    )
    validate_recipe(recipe)  # 20 classes, 10 tasks
    with pytest.raises(ValueError, match="data.num_tasks=3 does not divide the 20 classes"):
        validate_recipe(apply_overrides(recipe, ["data.num_tasks=3"]))


def test_push_to_hub_checks_repo_id_and_token_first(local_hub_server, monkeypatch):
    hub = {
        "push_to_hub": True,
        "hub_model_id": "test-user/x",
        "strategy": "end",
        "token": None,
        "private": None,
    }
    check_hub_access(hub)  # logged in to the loopback Hub
    with pytest.raises(ValueError, match="hub.hub_model_id: 'a/b/c' is not a valid repo id"):
        check_hub_access({**hub, "hub_model_id": "a/b/c"})
    with pytest.raises(ValueError, match="push_to_hub: the Hub did not accept the token"):
        check_hub_access({**hub, "token": "hf_wrong"})
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="no Hugging Face token found"):
        check_hub_access(hub)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path]),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "train_cl.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    """The real entry point: `--no-pgp training.per_device_train_batch_size=0` (an override after a flag)
    fails before any work."""
    completed = _cli(
        "--no-pgp", "training.per_device_train_batch_size=0", "--output_dir", "out", cwd=tmp_path
    )
    assert completed.returncode == 2
    assert completed.stderr.splitlines() == [
        "error: training.per_device_train_batch_size: must be a positive integer, got 0; "
        "e.g. training.per_device_train_batch_size=1"
    ]
    assert not (tmp_path / "out").exists()


def test_cli_second_run_into_a_locked_folder_fails(tmp_path, capsys, restore_logging):
    (tmp_path / "out").mkdir()
    with OutputFolderLock(tmp_path / "out"):
        completed = _cli("--output_dir", "out", "training.num_train_epochs=1", cwd=tmp_path)
        assert completed.returncode == 2
        assert (
            completed.stderr.strip()
            .splitlines()[-1]
            .startswith(f"error: output_dir out is in use by another run (pid {os.getpid()} on host")
        )
        assert "Traceback" not in completed.stderr
        with pytest.raises(RunFolderError, match="in use by another run"):  # --debug: the exception itself
            main(["--output_dir", str(tmp_path / "out"), "--debug"])


def test_divergence_names_task_step_setting_and_checkpoint(
    assets, tmp_path, capsys, restore_logging, fast_plots
):
    """base_lr=1e30 through main(): one error line, exit code 2, the lock released."""
    out = tmp_path / "out"
    recipe = load_recipe("demo")
    args = ["--output_dir", str(out), *assets.overrides(recipe), "data.num_tasks=2", "training.base_lr=1e30"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1
    last = err[err.index("error: ") :].splitlines()[0]  # it may follow a progress bar cut short
    assert last.startswith("error: training diverged in task 0 at step ")
    assert "training.base_lr" in last and "holds no checkpoint of this run" in last
    assert "Traceback" not in err
    assert not (out / LOCK_NAME).exists()  # released on the error path


# ----------------------------------------------------------------------------- divergence (in process)
def test_non_finite_parameters_or_grams_stop_with_a_named_error(tmp_path):
    from pgp_peft.trainer import TrainingDivergedError

    splits = tiny_cl.make_splits(num_tasks=2, train_per_class=4, test_per_class=2)
    model = tiny_cl.make_model("l2p", num_classes=4)
    trainer = tiny_cl.make_trainer(model, splits, str(tmp_path), num_train_epochs=1)
    trainer.current_task = 1
    (tmp_path / "checkpoint-task-0").mkdir()
    (tmp_path / "checkpoint-task-0" / "continual_state.json").write_text("{}")
    trainer.check_finite_parameters()  # healthy
    with torch.no_grad():
        model.method.prompt_pool.prompt.view(-1)[0] = float("inf")
    with pytest.raises(
        TrainingDivergedError, match=r"in task 1 at step 0: non-finite values in parameter\(s\)"
    ) as info:
        trainer.check_finite_parameters()
    assert "training.base_lr" in str(
        info.value
    ) and "checkpoint-task-0 (continue from it with --resume)" in str(info.value)
    model.register_task_classes(0, [0, 1])
    with pytest.raises(
        TrainingDivergedError, match="non-finite values in the memory representation of space"
    ):
        trainer.update_memory(0)  # the prompt term of the Gram matrix holds inf: refused before eigh

    def failing_eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    import pgp_peft.trainer

    with pytest.MonkeyPatch.context() as patch:  # finite but astronomically large values
        patch.setattr(pgp_peft.trainer, "update_memory", failing_eigh)
        with pytest.raises(TrainingDivergedError, match="the memory update's eigendecomposition failed"):
            trainer.update_memory(0)


# ----------------------------------------------------------------------------- data quirks
def test_float_and_string_labels_are_refused():
    images = [Image.new("RGB", (4, 4))] * 4
    floats = datasets.Dataset.from_dict({"image": images, "label": [0.2, 0.7, 1.0, 1.5]})
    with pytest.raises(
        ValueError, match=r"label column 'label' holds (double|float) values \(e.g. \[0.2, 0.7, 1.0\]\)"
    ):
        make_class_incremental_splits(floats, floats, num_tasks=1)
    names = datasets.Dataset.from_dict({"image": images, "label": ["a", "b", "a", "b"]})
    with pytest.raises(ValueError, match="class_encode_column"):
        make_class_incremental_splits(names, names, num_tasks=1)


def test_a_class_without_test_images_is_named_in_a_warning():
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    image = Image.new("RGB", (4, 4))
    train = datasets.Dataset.from_dict({"image": [image] * 4, "label": [0, 0, 1, 1]}, features=features)
    test = datasets.Dataset.from_dict({"image": [image] * 2, "label": [0, 0]}, features=features)
    with pytest.warns(UserWarning, match=r"class\(es\) \['dog'\] \(label ids \[1\]\) have no test images"):
        make_class_incremental_splits(train, test, num_tasks=1)


def test_broken_image_files_are_reported_by_path_before_training(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / name / f"{i}.png")
    good = (root / "train" / "cat" / "0.png").read_bytes()
    (root / "train" / "cat" / "0.png").write_bytes(good[: len(good) // 2])  # truncated
    Image.new("RGB", (8, 8)).save(root / "test" / "dog" / "0.jpg", quality=90)
    jpeg = (root / "test" / "dog" / "0.jpg").read_bytes()
    (root / "test" / "dog" / "0.jpg").write_bytes(jpeg[:-2])  # no end-of-image marker
    train, test = load_image_dataset(str(root))
    with pytest.raises(ValueError, match=r"the train split: 1 unreadable image file\(s\): .*train/cat/0.png"):
        verify_image_files(train, "image", "the train split")
    with pytest.raises(ValueError, match=r"1 unreadable .*test/dog/0.jpg \(truncated JPEG"):
        verify_image_files(test, "image", "the test split")
    data = {**load_recipe("demo")["data"], "dataset": str(root), "num_tasks": 1, "image_size": 8}
    with pytest.raises(ValueError, match="train/cat/0.png"):
        build_datasets(data)  # the runner checks before it builds the tasks


def test_every_shipped_recipe_passes_the_early_checks():
    for name in available_recipes():
        validate_recipe(load_recipe(name))


def test_a_hub_token_in_the_recipe_is_never_written_to_results():
    from pgp_peft.trainer import _without_secrets

    recipe = apply_overrides(load_recipe("demo"), ["hub.token=hf_secret"])
    public = _without_secrets(recipe)
    assert public["hub"]["token"] == "<redacted>" and recipe["hub"]["token"] == "hf_secret"
    assert _without_secrets(load_recipe("demo")) == load_recipe("demo")
