"""Files lowmem writes itself (metrics, benchmark results, plots) are written atomically.

Each file is written to a temporary file in the same directory, flushed to disk, given the
permissions a plain ``open(path, "w")`` would give (``0o666`` minus the umask, so ``0644`` under
umask ``022``; an existing file keeps its mode), then moved over the target with ``os.replace``:
a reader, or a crash, sees the old file or the new one, never half of one, and no temporary file
is left behind, even when writing fails.

* :func:`write_text_atomic` / :func:`write_bytes_atomic`: one file (``metrics.json``).
* :func:`write_files_atomic`: several files that belong together (``bench.json`` + ``bench.md``):
  every new content is written and synced first, then the files are replaced one after the other,
  so a failure while writing leaves all the old files in place.
* A plot: ``fig.savefig(buf := io.BytesIO(), format="png")`` then
  ``write_bytes_atomic(path, buf.getvalue())``.
* :func:`install_staged`: a set of files written by another library (``save_pretrained``: the
  final model of ``lowmem train``) into a staging directory, moved into their directory by
  renames, the files they replace kept in ``previous-K`` until every new one is in place;
  :func:`staging_dir` gives the staging folder, :func:`weights_last` the install order of a saved model
  (``lowmem train``'s final model, ``lowmem.kit.save_tiny_model``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping


def _umask_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the existing file's, else ``0o666 & ~umask``."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return _umask_mode()


def umask_permissions(directory: str | os.PathLike) -> None:
    """Give every file under ``directory`` (newly written ones: a staged save, a fresh checkpoint) the mode a
    plain ``open(path, "w")`` gives (``0o666 & ~umask``). safetensors (0.8) creates its files 0600 whatever the
    umask, so a saved model's weights were readable by their owner only, beside its config at 0644 (a serving
    process of another user, a group-shared output folder: "Permission denied")."""
    mode = _umask_mode()
    for p in Path(directory).rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a synced temporary file next to ``path``, with ``path``'s future mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), _new_file_mode(path))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _sync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported everywhere (Windows): the replace itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_files_atomic(files: Mapping[str | os.PathLike, str | bytes]) -> list[Path]:
    """Write each ``{path: text or bytes}`` atomically; all contents are written before any file
    is replaced. Text is encoded as UTF-8. Returns the paths."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, content in files.items():
            path = Path(path)
            data = content.encode() if isinstance(content, str) else bytes(content)
            temps.append((_write_temp(path, data), path))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise
    for d in {path.parent for _, path in temps}:
        _sync_dir(d)
    return [path for _, path in temps]


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    return write_files_atomic({path: data})[0]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: a reader (or a crash) sees the old file or the
    new one, never half of one."""
    return write_files_atomic({path: text})[0]


def free_name(directory: str | os.PathLike, stem: str) -> Path:
    """``directory/stem-K`` for the first K >= 1 that does not exist."""
    k = 1
    while (Path(directory) / f"{stem}-{k}").exists():
        k += 1
    return Path(directory) / f"{stem}-{k}"


# The files ``save_pretrained`` writes for a model, a peft adapter or a tokenizer. An earlier model's that a new save
# does not overwrite would load with the new one (an adapter_config.json beside a new full model: transformers'
# from_pretrained attaches that adapter), so installing a saved model replaces them all (install_staged(replaces=)).
SAVED_MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
)


def saved_model_file(name: str) -> bool:
    """Whether ``name`` is one of :data:`SAVED_MODEL_FILES`."""
    import fnmatch

    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SAVED_MODEL_FILES)


def install_staged(staged: str | os.PathLike, target: str | os.PathLike, aside_stem: str = "previous",
                   order: Callable[[str], int] | None = None,
                   replaces: Callable[[str], bool] | None = None) -> Path | None:
    """Move every entry of the directory ``staged`` into ``target`` (created if missing) by renames
    (same file system, no copy), then remove ``staged``. Returns the folder the replaced entries
    were kept in while installing (already deleted), or `None` when nothing was replaced.

    Nothing is written in place: ``staged`` holds the complete new files before this is called (a
    kill before that leaves ``target`` untouched). The entries of ``target`` the new ones replace
    are first renamed into ``target/<aside_stem>-K`` (the first free K; in descending ``order``, so
    the old weights leave first), then the new entries are
    renamed in, in ascending ``order(name)`` (e.g. the weights last, so that a directory a kill left
    half-installed lacks them and no loader takes it as complete), and only then is the aside
    folder deleted: until the new set is whole, the old one is recoverable from it. Other entries
    of ``target`` (checkpoints, logs) are not touched, except the files ``replaces(name)`` selects (e.g.
    :func:`saved_model_file`: an earlier model's files the new set lacks), which leave with the replaced ones. The
    new files get the mode ``open(path, "w")`` gives (:func:`umask_permissions`)."""
    staged, target = Path(staged), Path(target)
    umask_permissions(staged)  # safetensors' 0600: the installed files get what open() would give
    names = sorted((p.name for p in staged.iterdir()), key=lambda n: (order(n) if order else 0, n))
    target.mkdir(parents=True, exist_ok=True)
    replaced = [n for n in names if os.path.lexists(target / n)]
    if replaces is not None:  # an earlier model's files the new set does not overwrite
        replaced += [p.name for p in target.iterdir() if p.name not in names and p.is_file() and replaces(p.name)]
    aside = None
    if replaced:
        aside = free_name(target, aside_stem)
        aside.mkdir()
        # the last-installed (the weights) leave first
        for n in sorted(replaced, key=lambda n: (order(n) if order else 0, n), reverse=True):
            os.replace(target / n, aside / n)
    for n in names:
        os.replace(staged / n, target / n)
    _sync_dir(target)
    staged.rmdir()
    if aside is not None:
        shutil.rmtree(aside)
    return aside


def weights_last(name: str) -> int:
    """Install order (``install_staged(order=...)``) of a saved model's files: the weights after the rest, a shard
    index after its shards, so that a directory a kill left half-installed has no (complete) weights and no loader
    takes it."""
    return 2 if name.endswith(".index.json") else 1 if name.endswith((".safetensors", ".bin", ".pt")) else 0


def staging_dir(parent: str | os.PathLike, what: str) -> Path:
    """An empty ``parent/.lowmem-<what>`` to stage a save in (a leftover of a killed save removed: it never became
    the model)."""
    staging = Path(parent) / f".lowmem-{what}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging
