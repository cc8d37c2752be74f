"""The run directory on disk: crash-safe checkpoints (safetensors + JSON, no pickle) and the JSONL logs.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding the adapter (PEFT layout), the
optimizer state and every random stream. It is written to a temporary folder, fsynced, then
renamed; the `latest` pointer file is replaced last. A kill at any moment (SIGKILL included)
leaves the previous checkpoint and pointer intact. Loading one runs no code from the files.
"""
from __future__ import annotations

import errno
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from tinyrl.cli import UserError
from tinyrl.lora import load_adapter, save_adapter

LATEST = "latest"


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to `path` so that readers see the old file or the new one, never a torn one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def publish_dir(tmp: str, final: str) -> None:
    """fsync every file of `tmp`, then move it to `final` (replacing an older `final`)."""
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)
    old = final + ".old"
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)  # if we die here, `recover_dir` puts it back
    os.rename(tmp, final)
    _fsync(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str) -> None:
    """Undo a `publish_dir` that was killed between its two renames."""
    if not os.path.exists(final) and os.path.exists(final + ".old"):
        os.rename(final + ".old", final)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict split into tensors (for safetensors) and plain JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, scalars in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]  # JSON made tuples (AdamW's betas) into lists
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: str, step: int, model, optimizer, state: dict, tensors: dict[str, torch.Tensor],
                    keep: int, base_model: str = "") -> str:
    """Write checkpoint `step` atomically, point `latest` at it, and keep only the last `keep`."""
    ckpts = os.path.join(run_dir, "checkpoints")
    name = f"step-{step:06d}"
    tmp, final = os.path.join(ckpts, f".tmp-{name}"), os.path.join(ckpts, name)
    try:
        os.makedirs(ckpts, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_adapter(model, os.path.join(tmp, "adapter"), base_model)
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        save_file({**{f"optim.{k}": v for k, v in opt_tensors.items()},
                   **{f"rng.{k}": v.cpu() for k, v in tensors.items()}}, os.path.join(tmp, "state.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, **state, "optimizer": opt_meta}, f)
        publish_dir(tmp, final)
        write_json_atomic(os.path.join(run_dir, LATEST), {"checkpoint": f"checkpoints/{name}", "step": step})
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        why = "the disk is full" if e.errno == errno.ENOSPC else str(e)
        raise UserError(f"could not save checkpoint step {step}: {why}. The previous checkpoint "
                        f"{previous or '(none)'} is intact; free space and --resume {run_dir}") from None
    steps = sorted(d for d in os.listdir(ckpts) if d.startswith("step-"))
    for old in steps[:-keep]:
        if old != name:
            shutil.rmtree(os.path.join(ckpts, old), ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint of a run: where `latest` points, else the newest whole folder."""
    ckpts = os.path.join(run_dir, "checkpoints")
    try:
        with open(os.path.join(run_dir, LATEST)) as f:
            path = os.path.join(run_dir, json.load(f)["checkpoint"])
        recover_dir(path)
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    except (OSError, ValueError, KeyError):
        pass
    if not os.path.isdir(ckpts):
        return None
    whole = [d for d in sorted(os.listdir(ckpts)) if d.startswith("step-") and not d.endswith(".old")
             and os.path.isfile(os.path.join(ckpts, d, "state.json"))]
    return os.path.join(ckpts, whole[-1]) if whole else None


def load_checkpoint(path: str, model, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore adapter and optimizer from checkpoint folder `path`; return (JSON state, random-stream tensors)."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        tensors = load_file(os.path.join(path, "state.safetensors"))
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is unreadable: {e}") from None
    load_adapter(model, os.path.join(path, "adapter"))
    load_optimizer(optimizer, {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")},
                   state.pop("optimizer"))  # load_state_dict moves the state to each parameter's device
    return state, {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop lines logged after `last_step` (and any torn last line): they are redone after a resume."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line)
            except (ValueError, KeyError):
                break
    with open(path, "w") as f:
        f.writelines(keep)


def append_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()


class TensorBoard:
    """A copy of metrics.jsonl's numbers as TensorBoard scalars in RUN_DIR/tensorboard (`--report-to
    tensorboard`). metrics.jsonl stays the record: after a resume, events past the checkpoint are purged
    just as its lines are."""

    def __init__(self, run_dir: str, resumed_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resumed_step + 1 or None)

    def log(self, line: dict) -> None:
        for key, value in line.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key, value, line["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
