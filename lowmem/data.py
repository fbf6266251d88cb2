"""The user's own data for ``lowmem train``: local files loaded with ``datasets``, checked against TRL's formats.

Nothing is downloaded: a ``dataset`` is a local path, read with the ``datasets`` library's packaged
builders (``json``, ``csv``, ``parquet``, ``text``) or ``datasets.load_from_disk``. The columns
follow TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats) for each trainer:

| trainer | format | columns |
|---|---|---|
| ``sft`` | language modeling | ``text`` |
| ``sft`` | conversational language modeling | ``messages`` (a list of ``{role, content}``) |
| ``sft`` | prompt-completion | ``prompt``, ``completion`` (strings, or lists of messages) |
| ``dpo`` | preference | ``prompt``, ``chosen``, ``rejected`` (strings, or lists of messages) |
| ``dpo`` | preference, implicit prompt | ``chosen``, ``rejected`` (TRL extracts the shared prompt) |
| ``grpo``, ``gvpo``, ``bnpo`` | prompt-only | ``prompt`` (a string, or a list of messages), plus any columns: they reach the reward functions as keyword arguments |

Conversational rows are rendered by the tokenizer's chat template inside TRL's trainers; a
tokenizer without one needs the recipe's ``chat_template`` (a Jinja string or a ``.jinja`` file).
Every function here raises ``ValueError`` / ``FileNotFoundError`` naming what it found and what it
expected; ``lowmem train`` turns them into one line and exit code 2::

    from lowmem.data import load_local_dataset, detect_format
    ds = load_local_dataset("data/train.jsonl")
    fmt = detect_format(ds, "sft", source="data/train.jsonl")   # DatasetFormat(name='messages', ...)
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# file suffix -> packaged ``datasets`` builder (nothing is fetched from the Hub)
EXTENSIONS: dict[str, str] = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet",
    ".txt": "text", ".text": "text",
}
CHECKED_ROWS = 1000  # rows check_template_renders renders in full (beyond them, one row per distinct role sequence)
ROW_BATCH = 10_000  # rows read into Python at a time by the all-rows checks
# a saved DatasetDict's splits, as a folder of files names them (datasets' SPLIT_KEYWORDS: validation / valid / dev / val)
SPLIT_PREFERENCE = {"train": ("train",), "eval": ("validation", "valid", "dev", "val", "test", "eval")}
# sharegpt's speaker names, which a conversion from {from, value} turns can leave in ``role``: refused, with the rename
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}

# accepted formats per trainer: (format name, required columns, description for messages)
SFT_FORMATS = (
    ("text", ("text",), "'text' (language modeling)"),
    ("messages", ("messages",), "'messages' (conversational: a list of {role, content})"),
    ("prompt-completion", ("prompt", "completion"), "'prompt' + 'completion' (standard or conversational)"),
)
DPO_FORMATS = (
    ("preference", ("prompt", "chosen", "rejected"), "'prompt' + 'chosen' + 'rejected' (standard or conversational)"),
    ("implicit-prompt preference", ("chosen", "rejected"),
     "'chosen' + 'rejected' with the prompt inside both (implicit prompt, standard or conversational)"),
)
RL_FORMATS = (
    ("prompt-only", ("prompt",), "'prompt' (standard or conversational) plus any extra columns for the reward functions"),
)
FORMATS: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {
    "sft": SFT_FORMATS, "dpo": DPO_FORMATS, "grpo": RL_FORMATS, "gvpo": RL_FORMATS, "bnpo": RL_FORMATS,
}


@dataclass(frozen=True)
class DatasetFormat:
    """What :func:`detect_format` found.

    Parameters:
        name (`str`):
            TRL format: ``"text"``, ``"messages"``, ``"prompt-completion"``, ``"preference"``,
            ``"implicit-prompt preference"`` or ``"prompt-only"``.
        columns (`tuple[str, ...]`):
            The columns that define the format (e.g. ``("prompt", "completion")``).
        conversational (`bool`):
            Whether those columns hold lists of ``{role, content}`` messages (rendered with the chat template).
        extra_columns (`tuple[str, ...]`):
            The dataset's other columns (for GRPO/GVPO/BNPO: the reward functions' keyword arguments).
    """

    name: str
    columns: tuple[str, ...]
    conversational: bool
    extra_columns: tuple[str, ...] = ()

    def describe(self) -> str:
        kind = "conversational" if self.conversational else "standard"
        extra = f", extra columns {list(self.extra_columns)}" if self.extra_columns else ""
        return f"{self.name} ({kind}; columns {list(self.columns)}{extra})"


def _data_files(folder: Path) -> list[Path]:
    """Data files under ``folder`` (recursively, hidden files and folders skipped), sorted. The dataset
    card of a Hub snapshot (``README.md`` at the top, beside ``data/train-*.parquet``; what
    ``huggingface-cli download --repo-type dataset --local-dir`` writes) is no data file: skipped, as
    ``datasets.load_dataset(folder)`` skips it (before, it was an unknown extension or "a file of no split")."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if rel.as_posix().lower() == "readme.md":
            continue
        files.append(path)
    return files


def _csv_string_features(file: Path):
    """``datasets.Features`` reading every column of a CSV file (named by its header row) as a string."""
    import csv

    import datasets

    with open(file, newline="", encoding="utf-8-sig") as f:  # a byte-order mark (Excel's "CSV UTF-8") is no header text
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header}) if header else None


def _has_utf8_bom(file: Path) -> bool:
    """Whether ``file`` starts with the UTF-8 byte-order mark ``EF BB BF`` (Excel's "CSV UTF-8", Windows Notepad):
    read as ``utf-8-sig`` so the mark is neither a header's first character nor trained on as text."""
    with open(file, "rb") as f:
        return f.read(3) == b"\xef\xbb\xbf"


def _split_files(folder: Path, files: list[Path], split: str, field_name: str) -> list[Path]:
    """The files of ``folder`` that make up ``split``, by the Hub's file-name conventions
    (``datasets.data_files.get_data_patterns``, file or subfolder names): ``train`` for ``train``;
    ``validation`` / ``valid`` / ``dev`` / ``val``, else ``test`` / ``eval``, for ``eval``. A folder without
    split names is one split: all its files are training data, and none can be an eval set."""
    import fnmatch

    from datasets.data_files import get_data_patterns

    patterns = {str(k): v for k, v in get_data_patterns(str(folder)).items()}
    if list(patterns) == ["train"] and patterns["train"] == ["**"]:  # no split names in the folder
        if split == "eval":
            raise ValueError(f"{field_name}: folder {str(folder)!r} has no file named for an eval split (validation*, "
                             "test*, eval*); expected such files, a single file, or eval_split")
        return files
    rel = {f: f.relative_to(folder).as_posix() for f in files}

    def matches(f: Path, pats: list[str]) -> bool:
        return any(fnmatch.fnmatch(rel[f], pat) or fnmatch.fnmatch(rel[f], pat.removeprefix("**/")) for pat in pats)

    by_split = {name: [f for f in files if matches(f, pats)] for name, pats in patterns.items()}
    unassigned = [rel[f] for f in files if not any(f in fs for fs in by_split.values())]
    if unassigned:
        raise ValueError(f"{field_name}: folder {str(folder)!r} holds files named for splits {sorted(patterns)} and "
                         f"files of no split {unassigned}; expected every file to belong to a split (train*, validation*, "
                         "test*), or a folder without split names")
    wanted = ("train",) if split == "train" else ("validation", "test")
    name = next((n for n in wanted if by_split.get(n)), None)
    if name is None:
        raise ValueError(f"{field_name}: folder {str(folder)!r} has splits {sorted(n for n, fs in by_split.items() if fs)}; "
                         f"expected a {' or '.join(wanted)} split")
    return by_split[name]


def held_out_split(path: Any) -> str | None:
    """The held-out data a ``dataset`` path also holds, which training on it leaves unused, in words:
    ``"its 'validation' split"`` of a saved ``DatasetDict`` (``SPLIT_PREFERENCE["eval"]``: ``validation`` /
    ``valid`` / ``dev`` / ``val`` / ``test`` / ``eval``, read
    from its ``dataset_dict.json``, nothing loaded), or ``"'validation.jsonl'"``, the first eval file of a
    folder of split-named files; else ``None`` (a file, a list of paths, a folder without split names)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = Path(path).expanduser()
    if (p / "dataset_dict.json").is_file():
        try:
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError):
            return None
        name = next((s for s in SPLIT_PREFERENCE["eval"] if s in splits), None)
        return f"its {name!r} split" if name else None
    if p.is_dir() and not is_saved_dataset(p):
        files = _data_files(p)
        try:
            found = _split_files(p, files, "eval", "dataset") if files else []
        except ValueError:
            return None
        return repr(found[0].relative_to(p).as_posix()) if found else None
    return None


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()
                           or (p / "dataset_dict.json").is_file())


def _json_records(file: Path, objects_only: bool = True):
    """``(where, value)`` for each record of a JSON file as ``datasets``' ``json`` builder reads it: every
    non-blank line of a JSON Lines file (``where`` = ``"line N"``, 1-based), or each item of a file holding
    one JSON array (``"item N"``, 0-based). Raises ``ValueError`` naming the file and the line (column) of
    the first line that is not JSON, not UTF-8 text, or (JSON Lines, ``objects_only``) not an object (a ``null``
    line ``datasets`` reads as a row of missing values; ``objects_only=False`` yields it)."""
    data = file.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a UTF-8 BOM (Windows editors), as datasets reads it
    head = data.lstrip()[:1]
    if head in (b"[", b"{"):  # one JSON document (an array, or one pretty-printed object)?
        try:
            whole = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            if head == b"[":  # an array that does not parse: where
                if isinstance(err, json.JSONDecodeError):
                    raise ValueError(f"{file} line {err.lineno} column {err.colno}: {err.msg}; expected one JSON array "
                                     "of objects (or JSON Lines: one object per line)") from None
                raise ValueError(f"{file} is not UTF-8 text ({err}); expected JSON") from None
            whole = None  # JSON Lines: read line by line below
        if isinstance(whole, list):
            yield from ((f"item {i}", v) for i, v in enumerate(whole))
            return  # else one object: a one-line JSON Lines file (its line below)
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{file} line {n} is not UTF-8 text ({err.reason} at byte {err.start}); expected "
                             "one JSON object per line (JSON Lines)") from None
        except json.JSONDecodeError as err:
            text = raw.decode("utf-8").strip()
            raise ValueError(f"{file} line {n} column {err.colno}: {err.msg} in {text[:80] + '...' if len(text) > 80 else text}; "
                             "expected one JSON object per line (JSON Lines)") from None
        if objects_only and not isinstance(value, dict):
            raise ValueError(f"{file} line {n} is {_short(value)}, not a JSON object; expected one object per line "
                             "(JSON Lines: {\"column\": value, ...})")
        yield f"line {n}", value


def json_row_line(path: str | os.PathLike, row: int) -> int | None:
    """The 1-based line of row ``row`` (0-based) of a JSON Lines file as ``datasets`` reads it (blank lines
    skipped), or ``None``: not a JSON Lines file, a folder, a JSON array file, or no such row."""
    p = Path(path).expanduser()
    if not (p.is_file() and EXTENSIONS.get(p.suffix.lower()) == "json"):
        return None
    try:
        for i, (where, _) in enumerate(_json_records(p, objects_only=False)):
            if not where.startswith("line "):
                return None
            if i == row:
                return int(where.split()[1])
    except (OSError, ValueError):
        return None
    return None


def folder_row_file(path: str | os.PathLike, row: int) -> tuple[Path, int] | None:
    """``(file, row within it)`` for row ``row`` (0-based) of a folder of JSON / Parquet files without split names,
    read in :func:`_data_files`' order as :func:`load_local_dataset` reads them; ``None`` otherwise (a file, a saved
    dataset, a folder with split names or of other files, no such row)."""
    p = Path(path).expanduser()
    if not p.is_dir() or is_saved_dataset(p):
        return None
    try:
        from datasets.data_files import get_data_patterns

        patterns = {str(k): v for k, v in get_data_patterns(str(p)).items()}
        files = _data_files(p)
        if list(patterns) != ["train"] or patterns["train"] != ["**"]:
            return None  # which split's files the row counts is not known here
        for f in files:
            kind = EXTENSIONS.get(f.suffix.lower())
            if kind == "json":
                count = sum(1 for _ in _json_records(f, objects_only=False))
            elif kind == "parquet":
                import pyarrow.parquet as pq

                count = pq.ParquetFile(f).metadata.num_rows
            else:
                return None
            if row < count:
                return f, row
            row -= count
    except (OSError, ValueError):
        return None
    return None


def _row_where(source: str, row: int) -> str:
    """``"3 (line 4)"`` for row 3 of a JSON Lines file ``source``; ``"2700 (file part-1.jsonl row 1200, line 1201)"``
    for a folder of files (:func:`folder_row_file`); else ``"3"``."""
    line = json_row_line(source, row)
    if line is not None:
        return f"{row} (line {line})"
    found = folder_row_file(source, row)
    if found is not None:
        file, inner = found
        line = json_row_line(file, inner)
        return (f"{row} (file {file.relative_to(Path(source).expanduser()).as_posix()} row {inner}"
                + (f", line {line})" if line is not None else ")"))
    return f"{row}"


def _json_feature_paths(feature, path=()):
    """The paths (column, then dict keys and ``[]`` for list items) of the ``datasets.Json`` features in
    ``feature``: the columns, or parts of them, whose values differed in type between rows."""
    import datasets

    if isinstance(feature, (dict, datasets.Features)):
        for key, sub in feature.items():
            yield from _json_feature_paths(sub, path + (key,))
    elif isinstance(feature, getattr(datasets, "Json", ())):
        yield path
    elif hasattr(feature, "feature"):  # List, LargeList, Sequence
        yield from _json_feature_paths(feature.feature, path + ("[]",))


def _values_at(value, path):
    if not path:
        yield value
    elif path[0] == "[]":
        for item in value if isinstance(value, list) else ():
            yield from _values_at(item, path[1:])
    elif isinstance(value, dict) and path[0] in value:
        yield from _values_at(value[path[0]], path[1:])


def check_json_types(files: list[Path], ds, field_name: str = "dataset") -> None:
    """Refuse a JSON column that mixes strings with other values where ``datasets`` would change the strings.

    ``datasets`` (5.x) reads a JSON column whose type differs between rows (``"answer": "19"`` in one row,
    ``"answer": 19`` in another) as its ``Json`` feature, which decodes every string that is itself JSON
    text: ``"19"`` becomes the number 19, ``"true"`` True, ``"[1, 2]"`` a list, silently, in every row.
    A reward function comparing strings then never matches, a template sees numbers. Strings that are not
    JSON text (``"abc"``) survive, so a column mixing them with other values is left alone.

    Raises:
        ValueError: Names the file, the column (``messages[].content`` for a part of one), the line of the
            first string that would change and of the first value that is no string, and what to write.
    """
    paths = list(_json_feature_paths(ds.features))
    if not paths:
        return
    for path in paths:
        name = path[0] + "".join("[]" if k == "[]" else f".{k}" for k in path[1:])
        changed = other = None
        for file in files:
            for where, record in _json_records(file):
                for v in _values_at(record, path):
                    if isinstance(v, str):
                        if changed is None:
                            try:
                                decoded = json.loads(v)
                            except ValueError:
                                continue
                            changed = (file, where, v, decoded)
                    elif v is not None and other is None:
                        other = (file, where, v)
                if changed and other:
                    break
            if changed and other:
                break
        if changed and other:
            (cf, cw, cv, dv), (of, ow, ov) = changed, other
            at = (lambda f, w: w if len(files) == 1 else f"{f} {w}")
            raise ValueError(
                f"{field_name}: column {name!r} of {str(files[0]) if len(files) == 1 else 'the files'} holds strings and "
                f"other values ({at(cf, cw)}: {cv!r}; {at(of, ow)}: {_short(ov)}), so datasets reads it as JSON and "
                f"turns the string {cv!r} into {_short(dv)} (every such string, silently); expected one type in "
                f"every row: write {name!r} as strings everywhere (\"{ov}\" if it is text) or as "
                f"{type(ov).__name__} everywhere")


@contextmanager
def _quiet_datasets():
    """No ``datasets`` progress bars while a local file is read (an error then stays one line)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_local_dataset(path: str | os.PathLike, *, split: str = "train", field_name: str = "dataset"):
    """Load a local dataset with the ``datasets`` library; never downloads.

    Args:
        path (`str` or `os.PathLike`):
            A ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` (``.pq``) / ``.txt`` file (a text file
            gives one ``text`` row per non-blank line; CSV cells are read as strings), a folder of such files (all
            of one kind, read together; files named for splits, ``train.jsonl`` and ``test.jsonl``,
            give the ``split`` asked for),
            or a folder written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``: see ``split``).
        split (`str`, defaults to `"train"`):
            Which split of a saved ``DatasetDict`` to use: ``"train"`` takes the ``train`` split,
            ``"eval"`` the first of ``validation``, ``valid``, ``dev``, ``val``, ``test``, ``eval`` (the names a
            folder of files uses for its eval split).
        field_name (`str`, defaults to `"dataset"`):
            The recipe field the path came from, used in error messages.

    Returns:
        `datasets.Dataset`: At least one row.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Unknown file extension, a folder with no data files or with files of several
            kinds, a ``DatasetDict`` without the split, an unreadable file, or an empty dataset.
    """
    import datasets

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{field_name}: {str(path)!r} does not exist (expected a local file or folder; "
                                "lowmem never downloads datasets)")
    if is_saved_dataset(p):
        loaded = datasets.load_from_disk(str(p))
        if isinstance(loaded, datasets.DatasetDict):
            wanted = SPLIT_PREFERENCE[split]
            name = next((s for s in wanted if s in loaded), None)
            if name is None:
                raise ValueError(f"{field_name}: {str(path)!r} is a DatasetDict with splits {list(loaded)}; "
                                 f"expected a split named {' or '.join(repr(s) for s in wanted)}")
            loaded = loaded[name]
        ds = loaded
    else:
        if p.is_dir():
            files = _data_files(p)
            if not files:
                raise ValueError(f"{field_name}: folder {str(path)!r} holds no data files (expected "
                                 f"{sorted(EXTENSIONS)} files, or a folder written by save_to_disk)")
            files = _split_files(p, files, split, field_name)
        else:
            files = [p]
        unknown = sorted({f.suffix or f.name for f in files if f.suffix.lower() not in EXTENSIONS})
        if unknown:
            raise ValueError(f"{field_name}: unknown file extension(s) {unknown} in {str(path)!r}; "
                             f"expected one of {sorted(EXTENSIONS)} or a folder written by save_to_disk")
        builders = sorted({EXTENSIONS[f.suffix.lower()] for f in files})
        if len(builders) > 1:
            raise ValueError(f"{field_name}: folder {str(path)!r} mixes file kinds {builders}; "
                             "expected files of one kind (json/jsonl, csv, parquet or text)")
        empty = [str(f) for f in files if f.stat().st_size == 0]
        if empty:
            raise ValueError(f"{field_name}: empty file(s) {empty}; expected at least one row")
        try:
            # CSV cells stay text (TRL formats are strings; "47" must not become the integer 47, "" not NaN)
            kw = {"features": _csv_string_features(files[0]), "keep_default_na": False} if builders[0] == "csv" else {}
            if builders[0] in ("csv", "text") and any(_has_utf8_bom(f) for f in files):
                kw["encoding"] = "utf-8-sig"  # Excel's "CSV UTF-8", Notepad: the mark dropped, as Python's csv docs advise
            with _quiet_datasets():
                ds = datasets.load_dataset(builders[0], data_files=[str(f) for f in files], split="train", **kw)
                if builders[0] == "text":  # one row per line; blank lines are separators, not examples
                    ds = ds.filter(lambda row: bool(row["text"].strip()))
        except Exception as err:  # the builders raise many types (ArrowInvalid, DatasetGenerationError, ...)
            cause = err.__cause__ or err
            if "corresponds to no data" in str(cause):  # e.g. a CSV with a header row only
                raise ValueError(f"{field_name}: {str(path)!r} is empty (no rows); expected at least one row") from err
            if builders[0] == "json":  # pyarrow's "in row 3" counts rows of a block, not lines: find the line
                for f in files:
                    try:
                        for _ in _json_records(f):
                            pass
                    except ValueError as located:
                        raise ValueError(f"{field_name}: could not read {str(path)!r} as json: {located}") from err
            raise ValueError(f"{field_name}: could not read {str(path)!r} as {builders[0]}: "
                             f"{type(cause).__name__}: {cause}") from err
        if builders[0] == "json":
            try:  # pyarrow's JSON reader keeps bytes that are no UTF-8 in string columns; reading the row then fails
                ds.data.table.validate(full=True)
            except Exception as err:
                for f in files:
                    try:
                        for _ in _json_records(f):
                            pass
                    except ValueError as located:
                        raise ValueError(f"{field_name}: could not read {str(path)!r} as json: {located}") from err
                raise ValueError(f"{field_name}: could not read {str(path)!r} as json: {err}") from err
            check_json_types(files, ds, field_name)
    if len(ds) == 0:
        raise ValueError(f"{field_name}: {str(path)!r} is empty (columns {ds.column_names}); expected at least one row")
    return ds


def split_eval(dataset, fraction: float, seed: int):
    """Hold out ``fraction`` of ``dataset`` for evaluation, shuffled by ``seed``.

    Args:
        dataset (`datasets.Dataset`): The training data.
        fraction (`float`): In ``(0, 1)``; the eval set gets ``ceil(fraction * len)`` rows.
        seed (`int`): Same seed, same split.

    Returns:
        `tuple[Dataset, Dataset]`: ``(train, eval)``, disjoint, both non-empty.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)`` or a split that leaves either side empty.
    """
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1):
        raise ValueError(f"eval_split must be a fraction in (0, 1); got {fraction!r}")
    n_eval = math.ceil(fraction * len(dataset))
    if n_eval >= len(dataset):
        raise ValueError(f"eval_split={fraction} of {len(dataset)} rows leaves no training rows; "
                         "expected a dataset with at least 2 rows and a smaller fraction")
    parts = dataset.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def is_messages(value: Any) -> bool:
    """Whether ``value`` is a non-empty list of ``{role, content}`` messages (TRL's conversational rows)."""
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _check_cell(value: Any, column: str, conversational: bool, source: str, row: int) -> None:
    if not (is_messages(value) if conversational else isinstance(value, str)):
        row = _row_where(source, row)  # "of row 3 (line 4)": the line a user's editor shows
    if conversational:
        if not is_messages(value):
            sharegpt = (isinstance(value, list) and value
                        and all(isinstance(m, dict) and "from" in m and "value" in m for m in value))
            if isinstance(value, str) and value.lstrip().startswith("["):
                try:
                    encoded = is_messages(json.loads(value))
                except ValueError:
                    encoded = False
                if encoded:  # a CSV / text cell holding the messages as JSON text
                    raise ValueError(f"{source}: column {column!r} of row {row} is JSON text of messages, not a list: "
                                     "CSV cells are strings only; write the rows as JSON Lines (one object per line, "
                                     "where messages stay a list) or Parquet")
            raise ValueError(f"{source}: column {column!r} of row {row} is {_short(value)}; expected a list of "
                             "{'role': ..., 'content': ...} messages (at least one) like the other conversational columns"
                             + (" (these are sharegpt-style {from, value} turns: write from/value -> role/content, "
                                "human -> user, gpt -> assistant)" if sharegpt else ""))
        problem = _message_problem(value)
        if problem:
            raise ValueError(f"{source}: column {column!r} of row {_row_where(source, row)}: {problem}")
    elif not isinstance(value, str):
        raise ValueError(f"{source}: column {column!r} of row {row} is {_short(value)}; expected a string "
                         "(standard format) or a list of {'role', 'content'} messages (conversational)")


def _check_prompt_not_repeated(row: dict[str, Any], cols: tuple[str, ...], conversational: bool, source: str,
                               i: int) -> None:
    """Refuse a conversational row whose ``completion`` / ``chosen`` / ``rejected`` messages start with the row's
    ``prompt`` messages: TRL renders ``prompt + completion``, so the prompt turns would be trained on twice (a
    dataset converted from the implicit-prompt form with the prompt kept in both)."""
    if not conversational or "prompt" not in cols or len(cols) < 2:
        return
    prompt = row["prompt"]
    rest = [c for c in cols if c != "prompt"]
    if prompt and all(isinstance(row[c], list) and len(row[c]) > len(prompt) and row[c][:len(prompt)] == prompt
                      for c in rest):
        raise ValueError(f"{source}: row {_row_where(source, i)}: {' and '.join(map(repr, rest))} start with the "
                         f"{len(prompt)} message(s) of 'prompt'; TRL appends them to the prompt, so those turns would "
                         f"appear twice. Remove the prompt's messages from {' and '.join(map(repr, rest))}, or drop the "
                         "'prompt' column (the implicit-prompt form: TRL then extracts the shared start itself)")


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80] + '...' if len(text) > 80 else text}"


def detect_format(dataset, trainer: str, *, source: str = "dataset", text_field: str = "text") -> DatasetFormat:
    """Which TRL dataset format ``dataset`` is in, for ``trainer``; the format columns of every row are checked
    (strings, or lists of ``{role, content}`` messages: :func:`check_all_rows`).

    Args:
        dataset (`datasets.Dataset`): Loaded data.
        trainer (`str`): ``"sft"``, ``"dpo"``, ``"grpo"``, ``"gvpo"`` or ``"bnpo"``.
        source (`str`, defaults to `"dataset"`): Where the data came from (for messages).
        text_field (`str`, defaults to `"text"`): SFT's text column (TRL's ``dataset_text_field``).

    Returns:
        :class:`DatasetFormat`: For SFT ``prompt``/``completion`` win over ``messages``, which wins
        over the text column (the order in which TRL's ``SFTTrainer`` looks).

    Raises:
        ValueError: No accepted format fits the columns (the message lists the columns found and
            the formats accepted), or a format column holds the wrong kind of value (strings mixed
            with message lists, numbers, ...).
    """
    if trainer not in FORMATS:
        raise ValueError(f"Unknown trainer {trainer!r}; valid: {list(FORMATS)}")
    formats = FORMATS[trainer]
    if trainer == "sft" and text_field != "text":
        formats = ((text_field, (text_field,), f"{text_field!r} (language modeling, dataset_text_field)"),) + formats[1:]
    order = formats if trainer != "sft" else (formats[2], formats[1], formats[0])  # TRL's SFT checks 'prompt' first
    columns = list(dataset.column_names)
    match = next(((name, cols) for name, cols, _ in order if set(cols) <= set(columns)), None)
    if match is None:
        accepted = "; ".join(desc for _, _, desc in formats)
        hint = _format_hint(columns, trainer)
        if trainer == "sft" and text_field != "text":  # the hints read FORMATS, whose text column is 'text'
            import difflib

            close = difflib.get_close_matches(text_field, columns, n=1, cutoff=0.7)
            hint = (f". dataset_text_field={text_field!r} names no column of the data"
                    + (" (its default, 'text', is one: drop dataset_text_field)" if "text" in columns
                       else f"; did you mean dataset_text_field: {close[0]}?" if close else ""))
        strings = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        if not hint and trainer == "sft" and strings:  # plain text under another name (TRL's dataset_text_field)
            hint = (f". To train on the text of column {strings[0]!r} (language modeling), set dataset_text_field: "
                    f"{strings[0]} (a top-level recipe key)")
        if len(dataset) == 1:  # one JSON object holding the rows: {"version": 1, "data": [{...}, ...]}
            nested = [c for c in columns if isinstance(dataset[0][c], list) and dataset[0][c]
                      and all(isinstance(r, dict) for r in dataset[0][c]) and not is_messages(dataset[0][c])]
            if nested:
                hint = (f". It is one row whose {nested[0]!r} holds a list of {len(dataset[0][nested[0]])} objects: write "
                        f"those rows themselves (a JSON array, or JSON Lines: one object per line)")
        raise ValueError(f"{source}: columns {columns} fit no {trainer} dataset format; accepted: {accepted}" + hint)
    name, cols = match
    if trainer == "sft" and text_field != "text" and text_field not in cols:
        raise ValueError(f"{source}: dataset_text_field={text_field!r}, but the rows are {name!r} data (columns "
                         f"{list(cols)}, which TRL's SFT reads before any text column), so "
                         + (f"column {text_field!r} would never be trained on" if text_field in columns
                            else "dataset_text_field would never be read")
                         + f"; drop dataset_text_field to train on {list(cols)}, or remove those columns to train on "
                         f"{text_field!r}")
    if trainer == "sft" and "prompt" in columns and "completion" not in columns:
        raise ValueError(f"{source}: column 'prompt' without 'completion' (columns {columns}, trained as {name!r}): "
                         "TRL's SFT reads any row with a 'prompt' column as prompt-completion data and fails on the "
                         "missing 'completion' after the model loads; rename 'prompt' (or drop it) to train on "
                         f"{list(cols)}, or add the 'completion' column")
    if trainer == "sft" and "completion" in columns and "prompt" not in columns:
        raise ValueError(f"{source}: column 'completion' without 'prompt' (columns {columns}, trained as {name!r}): "
                         "TRL's SFT reads a 'completion' only beside a 'prompt' and would train on "
                         f"{list(cols)} alone, never reading 'completion'; rename the prompt column to 'prompt' "
                         f"(prompt-completion data), or drop 'completion' to train on {list(cols)}")
    first = dataset[0]
    def column_wise(value: Any) -> bool:  # a column's values: a list of non-objects, or pandas' {"0": ..., "1": ...}
        return (isinstance(value, list) and not any(isinstance(v, dict) for v in value)
                or isinstance(value, dict) and bool(value) and all(str(k).isdigit() for k in value))

    if len(dataset) == 1 and all(column_wise(first[c]) for c in cols):
        sizes = {len(first[c]) for c in cols}
        if len(sizes) == 1 and sizes != {0}:  # {"prompt": [...], "completion": [...]}: pandas' to_json(), to_dict("list")
            raise ValueError(f"{source}: one row whose columns {list(cols)} each hold {sizes.pop()} values: the file is "
                             "column-wise JSON (one object of columns, as pandas' DataFrame.to_json() / to_dict('list') "
                             "write it); expected one object per row: JSON Lines (pandas: df.to_json(path, "
                             "orient='records', lines=True)) or a JSON array of row objects")
    conversational = any(is_messages(first[c]) for c in cols) or (name == "messages")
    check_all_rows(dataset, cols, conversational, source)
    extra = tuple(c for c in columns if c not in cols)
    if name == "implicit-prompt preference":
        _check_prompt_column_not_left_out(first, extra, conversational, source)
    if trainer in ("sft", "dpo"):  # (TRL's SFT and DPO trainers read only their format's columns)
        _check_system_column_not_left_out(first, cols, extra, conversational, source, trainer)
    return DatasetFormat(name=name, columns=tuple(cols), conversational=conversational, extra_columns=extra)


def _arrow_column(dataset, column: str):
    """The Arrow values of ``column`` for the rows ``dataset`` holds (through a ``select`` / ``filter``'s indices)."""
    import pyarrow as pa

    values = dataset.with_format("arrow")[column] if dataset._indices is not None else dataset.data.column(column)
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _is_string_feature(feature) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string") and type(feature).__name__ == "Value"


def check_all_rows(dataset, cols: tuple[str, ...], conversational: bool, source: str = "dataset") -> None:
    """Check the format columns ``cols`` of every row of ``dataset`` (:func:`_check_cell`, and for conversational
    prompt + completion / chosen / rejected rows :func:`_check_prompt_not_repeated`), before training.

    A standard-format column typed string by Arrow can only fail by a missing value: one ``is_null`` over the
    column; a conversational column typed as a list of ``{role, content}`` structs is checked by Arrow compute too
    (:func:`_messages_ok_in_arrow`). Any other column (mixing types: ``datasets``' ``Json`` feature; contents
    that are lists of parts) and the prompt-repeat check of conversational prompt + completion / chosen /
    rejected rows read the rows into Python :data:`ROW_BATCH` at a time. Before, only the first 1,000 rows were checked:
    a bad row 5,000 (a missing column, a number among strings, an empty conversation) reached TRL.

    Raises:
        ValueError: Naming the file, the row (and its line, for JSON Lines), the column and what was found.
    """
    import pyarrow.compute as pc

    python_cols = []
    for c in cols:
        if not conversational and _is_string_feature(dataset.features[c]):
            nulls = pc.is_null(_arrow_column(dataset, c))
            if pc.any(nulls).as_py():
                i = pc.index(nulls, True).as_py()
                _check_cell(None, c, conversational, source, i)
        elif not (conversational and _messages_ok_in_arrow(dataset, c, source, conversational)):
            python_cols.append(c)
    repeated = conversational and "prompt" in cols and len(cols) >= 2
    implicit = conversational and tuple(cols) == ("chosen", "rejected")
    if not python_cols and not repeated and not implicit:
        return
    read = list(cols) if repeated or implicit else python_cols
    for start in range(0, len(dataset), ROW_BATCH):
        batch = dataset.select_columns(read)[start:start + ROW_BATCH]
        for c in python_cols:
            for j, value in enumerate(batch[c]):
                if not _cell_ok(value, conversational):
                    _check_cell(value, c, conversational, source, start + j)
        for j in range(len(batch[read[0]])) if repeated or implicit else ():
            row = {c: batch[c][j] for c in cols}
            if repeated:
                _check_prompt_not_repeated(row, cols, conversational, source, start + j)
            if implicit:
                _check_implicit_prompt(row, source, start + j)


def _check_implicit_prompt(row: dict[str, Any], source: str, i: int) -> None:
    """A conversational implicit-prompt pair as TRL's ``extract_prompt`` splits it: the shared leading messages are
    the prompt, the rest are the answers. Refused: an empty prompt (no shared leading message: TRL's DPO failed
    mid-preparation with "Cannot apply chat template to an empty conversation", naming no row), or ``chosen`` equal
    to ``rejected`` (TRL splits them into two equal answers; the pair's loss has no gradient)."""
    from trl.data_utils import extract_prompt

    split = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
    problem = ("'chosen' and 'rejected' are the same messages: DPO learns nothing from the pair"
               if row["chosen"] == row["rejected"] else
               "the implicit prompt TRL extracts (the leading messages 'chosen' and 'rejected' share, with an answer "
               "left in each: trl.extract_prompt) is empty" if not split["prompt"] else None)
    if problem:
        roles = {c: [m.get("role") for m in row[c]] for c in ("chosen", "rejected")}
        raise ValueError(f"{source}: row {_row_where(source, i)}: {problem} (roles {roles}); expected both to start with "
                         "the same prompt messages and end with different answers, or a 'prompt' column (the explicit "
                         "preference format)")


def _messages_ok_in_arrow(dataset, column: str, source: str, conversational: bool) -> bool:
    """Check a conversational column typed by Arrow as a list of structs with string ``role`` and ``content``
    (what ``datasets`` reads from JSON Lines, Parquet or ``save_to_disk`` messages) with Arrow compute alone: a
    missing or empty list, a missing role, or a missing content (no ``tool_calls``) is the only way such a cell
    can fail; the first bad row goes through :func:`_check_cell` for the message. ``False``: another type (the
    caller reads the column into Python)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = _arrow_column(dataset, column)
    kind = values.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
        return False
    item = kind.value_type
    names = [item.field(k).name for k in range(item.num_fields)]
    if "role" not in names or "content" not in names or not all(
            pa.types.is_string(item.field(n).type) or pa.types.is_large_string(item.field(n).type)
            for n in ("role", "content")):
        return False
    bad_rows = pc.or_(pc.is_null(values), pc.equal(pc.list_value_length(values), 0)).fill_null(True)
    flat = values.flatten()
    roles, contents = flat.field("role"), flat.field("content")
    bad_items = pc.or_(pc.or_(pc.is_null(roles), pc.equal(pc.utf8_length(roles), 0)),
                       pc.is_in(roles, pa.array(sorted(SHAREGPT_ROLES), roles.type))).fill_null(True)
    no_content = pc.is_null(contents)
    if "tool_calls" in names:
        no_content = pc.and_(no_content, pc.is_null(flat.field("tool_calls")))
    bad_items = pc.or_(bad_items, no_content)
    first = []
    if pc.any(bad_rows).as_py():
        first.append(pc.index(bad_rows, True).as_py())
    if pc.any(bad_items).as_py():
        parents = pc.list_parent_indices(values)
        first.append(parents[pc.index(bad_items, True).as_py()].as_py())
    if first:
        i = min(first)
        _check_cell(dataset[i][column], column, conversational, source, i)
    return True


def _empty_answer_rows(dataset, column: str) -> list[int]:
    """The rows of conversational ``column`` holding an assistant message whose content is empty or whitespace (and
    no ``tool_calls``): Arrow compute over a list of ``{role, content}`` structs, else read into Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = _arrow_column(dataset, column)
    kind = values.type
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type):
        item = kind.value_type
        names = [item.field(k).name for k in range(item.num_fields)]
        if "role" in names and "content" in names and all(pa.types.is_string(item.field(n).type)
                                                          for n in ("role", "content")):
            flat = values.flatten()
            empty = pc.and_(pc.equal(flat.field("role"), "assistant"),
                            pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(flat.field("content"))), 0))
            if "tool_calls" in names:
                empty = pc.and_(empty, pc.is_null(flat.field("tool_calls")))
            empty = empty.fill_null(False)
            if not pc.any(empty).as_py():
                return []
            parents = pc.list_parent_indices(values)
            return sorted(set(pc.filter(parents, empty).to_pylist()))
    out = []
    for start in range(0, len(dataset), ROW_BATCH):
        for j, messages in enumerate(dataset.select_columns([column])[start:start + ROW_BATCH][column]):
            if any(isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)
                   and not m["content"].strip() and not m.get("tool_calls") for m in messages or ()):
                out.append(start + j)
    return out


def _cell_ok(value: Any, conversational: bool) -> bool:
    """Whether :func:`_check_cell` accepts ``value`` (the quick test; the message comes from it)."""
    if not conversational:
        return isinstance(value, str)
    return is_messages(value) and _message_problem(value) is None


def _message_problem(messages: list[dict[str, Any]]) -> str | None:
    """What is wrong with one message list whose items have ``role`` and ``content`` keys: a role that is no
    string, or a content that is ``None`` (a message without ``content`` in a file whose other messages have it:
    Arrow fills ``None``; a chat template renders it as the text ``None``). An assistant turn with
    ``tool_calls`` may have no content."""
    for k, m in enumerate(messages):
        if not isinstance(m["role"], str) or not m["role"]:
            return f"message {k} has role {m['role']!r}; expected a role string (system, user, assistant, ...)"
        if m["role"] in SHAREGPT_ROLES:
            return (f"message {k} has role {m['role']!r}, sharegpt's name: the chat template would render it as a role "
                    "of its own, which the model is never prompted with (and assistant_only_loss / generation know "
                    "only 'assistant'); write human -> user, gpt -> assistant")
        if m["content"] is None and not m.get("tool_calls"):
            return (f"message {k} (role {m['role']!r}) has no content (None: a message without 'content' where "
                    "others have one); expected a string (the chat template would render it as the text None)")
        if m["content"] is not None and not isinstance(m["content"], (str, list)):
            return (f"message {k} (role {m['role']!r}) has content {_short(m['content'])}; expected a string (or a list "
                    "of content parts)")
    return None


def check_nonempty(dataset, fmt: DatasetFormat, trainer: str, *, source: str = "dataset") -> None:
    """Refuse rows whose learned text is empty, over the whole dataset (not only the checked rows).

    An empty ``text`` / ``completion`` (SFT), ``chosen`` / ``rejected`` (DPO) or ``prompt`` (GRPO, GVPO,
    BNPO) would be trained on as an empty sequence, without a word from TRL. A prompt may be empty for
    SFT and DPO (unconditional text). Conversational columns (not ``prompt``): an assistant message whose content
    is empty or whitespace, without ``tool_calls`` (:func:`_empty_answer_rows`); a cell that is not a non-empty
    message list is refused by :func:`detect_format`.

    Raises:
        ValueError: Names the column, how many rows, and the first row numbers (0-based).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if fmt.conversational:
        for column in fmt.columns:
            if column == "prompt":
                continue
            rows = _empty_answer_rows(dataset, column)
            if rows:
                shown = rows[:5] + (["..."] if len(rows) > 5 else [])
                raise ValueError(f"{source}: {len(rows)} of {len(dataset)} rows have an assistant message with empty "
                                 f"content in {column!r} (rows {shown}, 0-based; the first is row "
                                 f"{_row_where(source, rows[0])}); {trainer} would train the model to answer with "
                                 "nothing there. Remove those rows (or write the answers) and run again")
        return
    for column in fmt.columns:
        if column == "prompt" and trainer in ("sft", "dpo"):
            continue
        # the rows the dataset holds: .data is the whole underlying table, also the rows a filter (blank lines
        # of a .txt file) or a select left out
        values = dataset.with_format("arrow")[column] if dataset._indices is not None else dataset.data.column(column)
        if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
            continue
        empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), True)
        rows = pc.indices_nonzero(empty).to_pylist() if hasattr(pc, "indices_nonzero") else \
            [i for i, e in enumerate(empty.to_pylist()) if e]
        if rows:
            shown = rows[:5] + (["..."] if len(rows) > 5 else [])
            lines = [json_row_line(source, r) for r in rows[:5]] if dataset._indices is None else [None]
            at = f"; lines {lines + (['...'] if len(rows) > 5 else [])}" if None not in lines else ""
            found = folder_row_file(source, rows[0]) if dataset._indices is None and not at else None
            if found is not None:  # a folder of files: where the first one is
                at = f"; the first is {_row_where(source, rows[0]).split(' (', 1)[1][:-1]}"
            raise ValueError(f"{source}: {len(rows)} of {len(dataset)} rows have an empty or missing {column!r} "
                             f"(rows {shown}, 0-based{at}); {trainer} would train on them as empty sequences. "
                             f"Remove those rows (or fill {column!r}) and run again")


# Column sets of other tools' dataset formats (LLaMA-Factory's alpaca and sharegpt, the Hub's common
# instruction sets) and what to write for TRL's format instead.
FOREIGN_FORMATS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("instruction", "output"), "alpaca-style 'instruction' / 'input' / 'output': write 'prompt' (instruction "
                                "and input) and 'completion' (output)"),
    (("conversations",), "sharegpt-style 'conversations': rename it 'messages' with {role, content} items "
                         "(from/value -> role/content, human -> user, gpt -> assistant)"),
    (("question", "answer"), "'question' / 'answer': rename them 'prompt' / 'completion' (SFT) or 'prompt' + "
                             "'answer' (GRPO with exact_match)"),
    (("question", "response_j", "response_k"), "StackExchange-paired 'question' / 'response_j' / 'response_k' "
                                               "(response_j the preferred answer): rename them 'prompt' / 'chosen' / "
                                               "'rejected'"),
)

# Parts of preference-pair column names in other datasets' spellings (chosen_response, response_rejected, preferred /
# dispreferred, accepted, better / worse, positive / negative, ...) -> TRL's column: the DPO hint's renames.
PAIR_COLUMN_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("rejected", ("reject", "dispref", "worse", "negative", "loser", "lose", "bad")),  # before 'chosen': dispreferred
    ("chosen", ("chosen", "prefer", "accept", "better", "positive", "winner", "win", "good")),
    ("prompt", ("prompt", "question", "instruction", "query")),
)


# Columns that hold a preference pair's prompt in other tools' formats: Intel/orca_dpo_pairs (system, question, chosen,
# rejected), LLaMA-Factory's alpaca pairwise (instruction, input, chosen, rejected), query / context / history ones.
PROMPT_LIKE_COLUMNS = ("question", "instruction", "query", "prompt_text", "user", "human", "conversation",
                       "conversations", "input", "context", "history", "system")  # the question first: named first


def _check_prompt_column_not_left_out(first: dict[str, Any], extra: tuple[str, ...], conversational: bool,
                                      source: str) -> None:
    """DPO rows of ``chosen`` + ``rejected`` and no ``prompt`` are TRL's implicit-prompt format: the prompt is the
    start that both share. A prompt held in a column of another name (:data:`PROMPT_LIKE_COLUMNS`: orca_dpo_pairs'
    ``question``, LLaMA-Factory's ``instruction`` / ``input``) was not read: the pair trained without its prompt (on
    the tiny Qwen3 of the NEWCOMER audit, chosen 'Four.' / rejected 'Five.' shared the "prompt" 'F'; TRL's only word
    was a tokenization warning). Such a column is an error naming it and the rename.

    Raises:
        ValueError: A prompt-like column beside an implicit-prompt pair; the message shows the shared start of
            row 0 and says to name the prompt column ``prompt``.
    """
    import os

    if conversational:
        chosen, rejected = first["chosen"] or [], first["rejected"] or []
        shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        start, text = f"{shared} shared leading message(s)", " ".join(str(m.get("content", "")) for m in chosen[:shared])
    else:
        text = os.path.commonprefix([str(first["chosen"]), str(first["rejected"])])
        start = repr(text[:40] + "..." if len(text) > 40 else text)
    # a prompt-like column whose row-0 text the shared start holds is a copy (the prompt is inside both): no error
    unread = sorted((c for c in extra if c.strip().lower() in PROMPT_LIKE_COLUMNS
                     and str(first[c] or "").strip() and str(first[c]).strip() not in text),
                    key=lambda c: PROMPT_LIKE_COLUMNS.index(c.strip().lower()))
    if not unread:
        return
    raise ValueError(
        f"{source}: column(s) {unread} are not read: 'chosen' + 'rejected' without 'prompt' is DPO's implicit-prompt "
        f"format, whose prompt is what both start with (row 0: {start}). Name the prompt column 'prompt' (rename "
        f"{unread[0]!r}" + (f" and join {unread[1:]} into it" if len(unread) > 1 else "") + ")")


# Columns that hold a system prompt in other tools' formats (LLaMA-Factory's alpaca / sharegpt ``system``, OpenHermes'
# ``system_prompt``, ...): TRL's SFT and DPO trainers read only their format's columns.
SYSTEM_COLUMNS = ("system", "system_prompt", "system_message")


def _check_system_column_not_left_out(first: dict[str, Any], cols: tuple[str, ...], extra: tuple[str, ...],
                                      conversational: bool, source: str, trainer: str) -> None:
    """Refuse a system-prompt column (:data:`SYSTEM_COLUMNS`) beside SFT's format columns whose row-0 text
    the format's cells do not already hold: TRL reads only ``cols``, so the system prompt never reached the model
    (the run trained without a word). An empty one, or a copy of a message already in the rows, loses nothing.

    Raises:
        ValueError: Naming the column, row 0's system text and where to put it.
    """
    def texts(value: Any) -> str:
        return " ".join(_texts(value)) if isinstance(value, (str, list)) else ""

    held = " ".join(texts(first[c]) for c in cols)
    for c in extra:
        value = first[c]
        if c.strip().lower() not in SYSTEM_COLUMNS or not isinstance(value, str) or not value.strip() \
                or value.strip() in held:
            continue
        where = "'prompt'" if "prompt" in cols else f"'{cols[0]}'"
        fix = (f"put it first in each row's {where} messages as {{'role': 'system', 'content': ...}} (a template "
               "without a system role folds it or refuses it)" if conversational else
               f"prepend it to each row's {where} string (or write the rows as messages with a system message)")
        raise ValueError(f"{source}: column {c!r} is not read: TRL's {trainer.upper()} trainer takes only the columns "
                         f"{list(cols)}, so the system prompt (row 0: {_short(value)}) would never reach the model; "
                         f"{fix}, or remove the column")


def _format_hint(columns: list[str], trainer: str) -> str:
    """What else the columns fit: another trainer's TRL format (``chosen`` / ``rejected`` under ``sft``:
    ``trainer: dpo``), or another tool's format (:data:`FOREIGN_FORMATS`); ``""`` when nothing does.
    A format of the trainer that the columns fill but for some (``prompt`` + ``chosen`` under ``dpo``)
    names the missing ones first."""
    missing = _missing_columns(columns, trainer)
    if missing:
        return missing
    if trainer == "dpo":
        renames = _pair_renames(columns)
        if renames:  # before "the format of trainer: grpo", which a lone prompt column fits
            return f". Did you mean to name the column(s) {', '.join(f'{c!r} -> {m!r}' for c, m in renames)}?"
    fits = sorted({t for t, formats in FORMATS.items() if t != trainer
                   and any(set(cols) <= set(columns) for _, cols, _ in formats)})
    if fits:  # (sft first when it fits: text / messages / prompt + completion given to dpo)
        return f". These columns are the format of trainer: {' / '.join(fits)} (set it in the recipe, or --trainer {next(t for t in FORMATS if t in fits)})"
    for cols, hint in FOREIGN_FORMATS:
        if set(cols) <= set(columns):
            return f". They look {hint}"
    import difflib

    wanted = sorted({c for _, cols, _ in FORMATS[trainer] for c in cols})
    pairs = [(c, m[0]) for c in columns if c not in wanted for m in [difflib.get_close_matches(c, wanted, n=1, cutoff=0.7)] if m]
    if pairs:
        text = (f" (or keep {pairs[0][0]!r} and set dataset_text_field: {pairs[0][0]})"
                if trainer == "sft" and [m for _, m in pairs] == ["text"] else "")
        return f". Did you mean to name the column(s) {', '.join(f'{c!r} -> {m!r}' for c, m in pairs)}{text}?"
    return ""


def _pair_renames(columns: list[str]) -> list[tuple[str, str]]:
    """``[(column, TRL's name)]`` for preference columns of other spellings (:data:`PAIR_COLUMN_PARTS`), when they
    name one chosen and one rejected column (and at most one prompt column); else ``[]``."""
    found: dict[str, list[str]] = {}
    for c in columns:
        name = c.strip().lower()
        trl = next((t for t, parts in PAIR_COLUMN_PARTS if any(part in name for part in parts)), None)
        if trl is not None and c != trl:
            found.setdefault(trl, []).append(c)
    if [len(found.get(t, [])) for t in ("chosen", "rejected")] != [1, 1] or len(found.get("prompt", [])) > 1:
        return []
    return [(found[t][0], t) for t in ("prompt", "chosen", "rejected") if t in found]


def _missing_columns(columns: list[str], trainer: str) -> str:
    """``". Missing column(s) [...] of the ... format"`` when the columns hold part of one of the trainer's
    formats beyond a lone ``prompt`` (which is a format of its own for GRPO), and no other column looks like a
    misspelling of a missing one (``promt``: the did-you-mean hint says more); else ``""``."""
    import difflib

    best = max(FORMATS[trainer], key=lambda f: (len(set(f[1]) & set(columns)), -len(set(f[1]) - set(columns))))
    present, absent = set(best[1]) & set(columns), [c for c in best[1] if c not in columns]
    others = [c for c in columns if c not in best[1]]
    if not present or present == {"prompt"} or any(difflib.get_close_matches(c, absent, n=1, cutoff=0.7) for c in others):
        return ""
    return f". Missing column(s) {absent} of the {best[2]} format (found {sorted(present)})"


def read_chat_template(chat_template: str) -> str:
    """The Jinja text of a recipe's ``chat_template``: the contents of a ``.jinja`` / ``.j2`` file, or the string itself.

    Raises:
        FileNotFoundError: A path ending in ``.jinja`` / ``.j2`` that does not exist.
        ValueError: Neither an existing file nor text containing Jinja tags (``{{`` or ``{%``), or
            a Jinja syntax error (its line named).
    """
    if chat_template.endswith((".jinja", ".j2")) or (len(chat_template) < 4096 and "\n" not in chat_template
                                                      and Path(chat_template).is_file()):
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"chat_template: file {chat_template!r} does not exist "
                                    "(expected a Jinja string or the path of a .jinja file)")
        text = path.read_text(encoding="utf-8")
    else:
        text = chat_template
    if "{{" not in text and "{%" not in text:
        raise ValueError(f"chat_template: {chat_template[:80]!r} is neither an existing .jinja file nor a Jinja "
                         "template (no '{{' or '{%' in it)")
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template  # what apply_chat_template compiles with

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as err:  # else a traceback from inside TRL when the first row is rendered
        where = chat_template if text is not chat_template else "(the recipe's text)"
        raise ValueError(f"chat_template {where}: Jinja syntax error on line {err.lineno}: {err.message}") from None
    return text


def ensure_chat_template(tokenizer, fmt: DatasetFormat, chat_template: str | None, *, model: str | None,
                         source: str = "dataset") -> None:
    """Give ``tokenizer`` the recipe's chat template, and require one for conversational data.

    Args:
        tokenizer: The model's tokenizer; ``chat_template`` is set on it (and saved with the model).
        fmt (:class:`DatasetFormat`): The training data's format.
        chat_template (`str` or `None`): The recipe's ``chat_template`` (see :func:`read_chat_template`);
            `None` keeps the tokenizer's own.
        model (`str` or `None`): The model directory, for the message (`None`: the embedded tiny model).
        source (`str`, defaults to `"dataset"`): Where the data came from, for the message.

    Raises:
        ValueError: ``fmt`` is conversational and neither the tokenizer nor the recipe has a chat template.
    """
    if chat_template is not None:
        template, own = read_chat_template(chat_template), getattr(tokenizer, "chat_template", None)
        if fmt.conversational and model and isinstance(own, str) and own.strip() and own != template:
            from lowmem._warn import warn_user

            warn_user(f"chat_template ({chat_template if len(chat_template) < 80 else chat_template[:77] + '...'}) "
                      f"replaces the chat template of the tokenizer of model {model!r}: the data is rendered with it and the "
                      "trained model is saved with it; drop chat_template to keep the model's own")
        tokenizer.chat_template = template
    if fmt.conversational and not getattr(tokenizer, "chat_template", None):
        where = f"model {model!r}" if model else "the embedded tiny model"
        raise ValueError(f"{source}: the {fmt.describe()} data is conversational, but the tokenizer of {where} has "
                         "no chat template; set chat_template in the recipe or --chat-template (a Jinja string or the "
                         "path of a .jinja file)")


def _conversations(row: dict[str, Any], fmt: DatasetFormat) -> list[tuple[list[dict[str, Any]], bool]]:
    """The message lists TRL renders for one conversational row: ``(messages, add_generation_prompt)``."""
    cols = fmt.columns
    if cols == ("prompt",):  # GRPO / GVPO / BNPO: the prompt, opened for the completion
        return [(row["prompt"], True)]
    if "prompt" in cols:  # prompt + completion / chosen / rejected
        return [(row["prompt"] + row[c], False) for c in cols if c != "prompt"]
    return [(row[c], False) for c in cols]


def _role_sequences(dataset, column: str) -> list[tuple[Any, ...]]:
    """The roles of each row's messages in the conversational ``column``, from Arrow's flattened ``role`` field
    when the column is a list of structs (0.1 s for 100,000 rows), else read into Python."""
    import pyarrow as pa

    values = _arrow_column(dataset, column)
    if (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)) and \
            pa.types.is_struct(values.type.value_type) and values.type.value_type.get_field_index("role") >= 0:
        roles = values.flatten().field("role").to_pylist()
        lengths = values.value_lengths().fill_null(0).to_pylist()
        out, at = [], 0
        for n in lengths:
            out.append(tuple(roles[at:at + n]))
            at += n
        return out
    out = []
    for start in range(0, len(dataset), ROW_BATCH):
        out.extend(tuple(m.get("role") for m in v) if isinstance(v, list) else ()
                   for v in dataset.select_columns([column])[start:start + ROW_BATCH][column])
    return out


def _rows_to_render(dataset, fmt: DatasetFormat) -> list[int]:
    """The rows :func:`check_template_renders` renders: the first :data:`CHECKED_ROWS`, then the first row of each
    sequence of roles (per rendered conversation, with its generation prompt) not seen before. A template refuses a
    row by its roles (Gemma's "System role not supported", Mistral's "Conversation roles must alternate"), so every
    row's roles are covered without rendering every row."""
    n = len(dataset)
    head = list(range(min(n, CHECKED_ROWS)))
    if n <= CHECKED_ROWS:
        return head
    per_column = {c: _role_sequences(dataset, c) for c in fmt.columns}
    if fmt.columns == ("prompt",):
        keys = [(r, True) for r in per_column["prompt"]]
    elif "prompt" in fmt.columns:
        others = [per_column[c] for c in fmt.columns if c != "prompt"]
        keys = [tuple(per_column["prompt"][i] + o[i] for o in others) for i in range(n)]
    else:
        keys = list(zip(*(per_column[c] for c in fmt.columns)))
    seen = {keys[i] for i in head}
    for i in range(CHECKED_ROWS, n):
        if keys[i] not in seen:
            seen.add(keys[i])
            head.append(i)
    return head


def _check_parts_rendered(messages: list[dict[str, Any]], text: str, where: str, i: int) -> None:
    """Refuse a rendering that holds a content part's Python text: a message whose ``content`` is a list of parts
    (``[{"type": "text", "text": ...}]``, the multimodal form) under a template that prints ``content`` as it is
    trained on ``[{'type': 'text', 'text': ...}]`` literally, without a word."""
    for m in messages:
        parts = m.get("content")
        if isinstance(parts, list) and any(isinstance(p, dict) and str(p) in text for p in parts):
            raise ValueError(f"{where}: row {_row_where(where, i)}: the chat template renders the content parts of a "
                             f"{m.get('role')!r} message as Python text ({str(parts)[:80]}...): it takes a string content "
                             "only; write each message's content as a string (the parts' text joined), or set "
                             "chat_template to one that takes content parts")


def check_template_renders(tokenizer, data: TrainData, *, source: str = "dataset", eval_source: str = "eval_dataset") -> None:
    """Render conversational rows of the training and eval data with ``tokenizer``'s chat template, as TRL will
    (``apply_chat_template``, text only): the first :data:`CHECKED_ROWS` and one row of each further sequence of
    roles (:func:`_rows_to_render`), so a row 5,000 whose roles the template refuses is found too.

    A template that refuses a row (``raise_exception``: Gemma's "System role not supported", Mistral's
    "Conversation roles must alternate user/assistant/user/assistant/...") was a ``jinja2`` traceback when TRL
    prepared the dataset (SFT, DPO) or at the first generation (GRPO), after the model loaded.

    A ``tools`` column (SFT, DPO) is passed as TRL passes it (JSON text decoded); a template that renders the first row
    holding tools the same as without them does not render tools, and TRL dropped them without a word. Likewise for
    messages' ``tool_calls``: the first row holding some is rendered again without them; the same text means the
    template drops the calls (an assistant tool call trained as an empty turn).

    Raises:
        ValueError: Naming the file, the row (and line, for JSON Lines), the template's message and the roles of
            that row; a ``tools`` cell that is not JSON, or tools / ``tool_calls`` the template does not render.
    """
    import jinja2

    if not data.format.conversational:
        return
    template = getattr(tokenizer, "chat_template", None)
    if template is not None and template == data.rendered_with:
        return  # these rows, this template: checked before the model loaded (recipe_data)
    # TRL's SFT and DPO pass a row's ``tools`` column to the template (json.loads of a string); GRPO's reward functions get it
    with_tools = data.format.columns != ("prompt",) and "tools" in data.format.extra_columns
    compare = with_tools  # until one row with tools shows that the template renders them
    compare_calls = True  # the same for messages' tool_calls (OpenAI / TRL tool-calling rows)
    for rows, where in ((data.train, source), (data.eval, eval_source)):
        if rows is None:
            continue
        for i in _rows_to_render(rows, data.format):
            tools = _row_tools(rows[i], where, i) if with_tools else None
            for messages, open_turn in _conversations(rows[i], data.format):
                try:
                    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn,
                                                         tools=tools)
                    _check_parts_rendered(messages, text, where, i)
                    if compare and tools and text == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=open_turn):
                        raise ValueError(
                            f"{where}: column 'tools' of row {_row_where(where, i)} holds tool schemas "
                            f"({', '.join(_tool_names(tools))}), but the chat template does not render tools: the row "
                            "renders the same without them, so the model would learn the calls without ever seeing the "
                            "tools (TRL passes the column to the template without a word); set chat_template to one "
                            "that renders `tools` (your model's tool-calling template), or remove the column")
                    compare = compare and not tools
                    if compare_calls and any(isinstance(m, dict) and m.get("tool_calls") for m in messages):
                        plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
                        if text == tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=open_turn,
                                                                 tools=tools):
                            calls = [m for m in messages if isinstance(m, dict) and m.get("tool_calls")]
                            raise ValueError(
                                f"{where}: row {_row_where(where, i)} has {calls[0].get('role')!r} messages with "
                                f"'tool_calls' ({', '.join(_tool_names(calls[0]['tool_calls']))}), but the chat template "
                                "does not render tool_calls: the row renders the same without them, so the model would "
                                "learn an empty turn where the call is (TRL passes the messages to the template without "
                                "a word); set chat_template to one that renders `tool_calls` (your model's "
                                "tool-calling template), or write the calls into the message content")
                        compare_calls = False  # this template renders them
                except jinja2.TemplateError as err:
                    roles = [m.get("role") for m in messages]
                    raise ValueError(f"{where}: the chat template refuses row {_row_where(where, i)} (roles {roles}): "
                                     f"{type(err).__name__}: {err}; change the row (e.g. fold a system message into the "
                                     "first user turn) or set chat_template to one that takes it") from None
    data.rendered_with = template


def _row_tools(row: dict[str, Any], where: str, i: int) -> list[Any] | None:
    """The ``tools`` cell of ``row`` as TRL's SFT and DPO trainers hand it to the chat template: JSON text decoded
    (a Parquet / CSV cell), a list as it is, an empty value as `None`."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError as err:
            raise ValueError(f"{where}: column 'tools' of row {_row_where(where, i)} is not JSON ({err}): TRL decodes "
                             "a string there with json.loads; write the tool schemas as a JSON list") from None
    return tools or None


def _tool_names(tools: Any) -> list[str]:
    """The function names of a ``tools`` list (OpenAI's ``{"type": "function", "function": {"name": ...}}``)."""
    names = []
    for t in tools if isinstance(tools, list) else [tools]:
        f = t.get("function", t) if isinstance(t, dict) else t
        names.append(repr(f.get("name")) if isinstance(f, dict) and f.get("name") else _short(t))
    return names


@dataclass
class TrainData:
    """The datasets of one run, as :func:`load_train_data` returns them.

    Parameters:
        train (`datasets.Dataset`): Training rows, in a TRL format.
        eval (`datasets.Dataset` or `None`): Held-out rows (``eval_dataset`` or ``eval_split``), or `None`.
        format (:class:`DatasetFormat`): The training data's format (the eval data has the same one).
    """

    train: Any
    eval: Any
    format: DatasetFormat
    rendered_with: str | None = None  # the chat template check_template_renders found rendering every checked row

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` records under ``data``."""
        return {"format": self.format.name, "conversational": self.format.conversational,
                "columns": list(self.format.columns), "extra_columns": list(self.format.extra_columns),
                "train_rows": len(self.train), "eval_rows": len(self.eval) if self.eval is not None else 0}


def load_sources(paths: str | list[str], trainer: str, *, split: str = "train", field_name: str = "dataset",
                 text_field: str = "text"):
    """Load one path or several (concatenated in order) and check they share one format for ``trainer``.

    Args:
        paths (`str` or `list[str]`): Paths for :func:`load_local_dataset`.
        trainer (`str`): Selects the accepted formats (:data:`FORMATS`).
        split (`str`, defaults to `"train"`): ``"train"`` or ``"eval"`` (for saved ``DatasetDict`` and split folders).
        field_name (`str`, defaults to `"dataset"`): The recipe field, for messages.
        text_field (`str`, defaults to `"text"`): SFT's ``dataset_text_field``.

    Returns:
        `tuple[Dataset, DatasetFormat]`: The rows, and the format of the first source.

    Raises:
        ValueError: As :func:`load_local_dataset` and :func:`detect_format`; sources in different
            formats, or whose columns or column types differ (both are named).
    """
    import datasets

    items = [paths] if isinstance(paths, str) else list(paths)
    parts, fmt = [], None
    for i, path in enumerate(items):
        where = field_name if len(items) == 1 else f"{field_name}[{i}]"
        ds = load_local_dataset(path, split=split, field_name=where)
        f = detect_format(ds, trainer, source=str(path), text_field=text_field)
        check_nonempty(ds, f, trainer, source=str(path))
        if fmt is not None and (f.name, f.conversational) != (fmt.name, fmt.conversational):
            raise ValueError(f"{where} {str(path)!r} is {f.describe()}, but {field_name}[0] {str(items[0])!r} is "
                             f"{fmt.describe()}; expected one format for all of {field_name}")
        if parts and ds.features != parts[0].features:
            raise ValueError(f"{where} {str(path)!r} has columns {dict(ds.features)}, but {field_name}[0] {str(items[0])!r} "
                             f"has {dict(parts[0].features)}; expected the same columns and types to concatenate them")
        fmt = fmt or f
        parts.append(ds)
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), fmt


def load_train_data(dataset: str | list[str], trainer: str, *, eval_dataset: str | list[str] | None = None,
                    eval_split: float | None = None, seed: int = 0, text_field: str = "text") -> TrainData:
    """Load ``dataset`` (and ``eval_dataset`` or an ``eval_split`` of it) and check their format for ``trainer``.

    Args:
        dataset (`str` or `list[str]`): Training data path, or several paths concatenated in order
            (:func:`load_sources`, :func:`load_local_dataset`).
        trainer (`str`): Selects the accepted formats (:data:`FORMATS`).
        eval_dataset (`str`, `list[str]` or `None`, defaults to `None`): Held-out data path(s); for a
            saved ``DatasetDict`` or a split folder its ``validation`` / ``test`` split.
        eval_split (`float` or `None`, defaults to `None`): Fraction of ``dataset`` held out by ``seed``
            instead. At most one of ``eval_dataset`` and ``eval_split``.
        seed (`int`, defaults to `0`): Seed of ``eval_split``.
        text_field (`str`, defaults to `"text"`): SFT's ``dataset_text_field``.

    Raises:
        ValueError: As :func:`load_sources`, both ``eval_dataset`` and ``eval_split``, or an eval set
            in another format than the training set.
    """
    if eval_dataset is not None and eval_split is not None:
        raise ValueError("eval_dataset and eval_split are exclusive: give a held-out file or a fraction, not both")
    train, fmt = load_sources(dataset, trainer, field_name="dataset", text_field=text_field)
    evals = None
    if eval_dataset is not None:
        evals, efmt = load_sources(eval_dataset, trainer, split="eval", field_name="eval_dataset", text_field=text_field)
        if (efmt.name, efmt.conversational) != (fmt.name, fmt.conversational):
            raise ValueError(f"eval_dataset {eval_dataset!r} is {efmt.describe()}, but dataset {dataset!r} is "
                             f"{fmt.describe()}; expected the same format")
    elif eval_split is not None:
        train, evals = split_eval(train, eval_split, seed)
    return TrainData(train=train, eval=evals, format=fmt)


def validate_data_fields(recipe: Any) -> None:
    """Check the data fields of a :class:`~lowmem.train.TrainRecipe` (types and ranges); no file is read.

    Fields: ``dataset``, ``eval_dataset``, ``eval_split``, ``chat_template``, ``reward_funcs``,
    ``reward_weights`` and their interplay with ``task``. Paths given as ``os.PathLike`` become `str`;
    data and ``.jinja`` paths are read (and must exist) when the run starts (:func:`recipe_data`); relative
    ones from a recipe file were made relative to its folder by :func:`lowmem.train.load_recipe`, others are
    from the current directory. Rewards are checked by
    :func:`lowmem.rewards.validate_reward_fields` (their code is imported only when training starts).

    Raises:
        ValueError: A wrong type or range, naming the field; ``dataset`` together with ``task``;
            ``eval_dataset``/``eval_split`` without ``dataset`` or together.
    """
    from .rewards import validate_reward_fields

    for name in ("dataset", "eval_dataset", "chat_template"):
        value = getattr(recipe, name)
        several = name != "chat_template" and isinstance(value, (list, tuple))
        items = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in (value if several else [value])]
        if value is not None and (not items or any(not isinstance(v, str) or not v.strip() for v in items)):
            what = "a non-empty string (a local path), a non-empty list of them, or null" if name != "chat_template" \
                else "a non-empty string (Jinja text or a .jinja path) or null"
            raise ValueError(f"Invalid {name}={value!r}: expected {what}")
        if value is not None:
            setattr(recipe, name, items if several else items[0])
    if recipe.dataset is not None and recipe.task is not None:
        raise ValueError(f"dataset={recipe.dataset!r} and task={recipe.task!r} are exclusive: task selects the embedded "
                         "synthetic data, dataset your own; remove one of them")
    if recipe.dataset is not None and recipe.trainer in ("grpo", "gvpo", "bnpo") and recipe.reward_funcs is None:
        raise ValueError(f"trainer {recipe.trainer!r} on dataset={recipe.dataset!r} needs reward_funcs (in the recipe, or "
                         "--reward-funcs): built-in names such as exact_match or format, 'module:function' or "
                         "'path/to/file.py:function'")
    if recipe.dataset is None:
        for name in ("eval_dataset", "eval_split"):
            if getattr(recipe, name) is not None:
                raise ValueError(f"{name} needs dataset (it splits or complements your own data; the synthetic task "
                                 "has its own held-out set, eval_size)")
    split = recipe.eval_split
    if split is not None:
        if isinstance(split, str):
            try:
                split = float(split)
            except ValueError:
                raise ValueError(f"Invalid eval_split={recipe.eval_split!r}: expected a fraction in (0, 1)") from None
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 < split < 1:
            raise ValueError(f"Invalid eval_split={recipe.eval_split!r}: expected a fraction in (0, 1)")
        recipe.eval_split = float(split)
    if recipe.eval_dataset is not None and recipe.eval_split is not None:
        raise ValueError("eval_dataset and eval_split are exclusive: give a held-out file or a fraction, not both")
    template = recipe.chat_template
    if template is not None and not (template.endswith((".jinja", ".j2")) or "{{" in template or "{%" in template):
        read_chat_template(template)  # an existing file without the suffix, else the error naming both forms
    validate_reward_fields(recipe)


def recipe_data(recipe: Any) -> TrainData | None:
    """The data of a :class:`~lowmem.train.TrainRecipe`: :func:`load_train_data` of its ``dataset``,
    or `None` when it trains on the synthetic ``task``. SFT's text column is
    ``training_args["dataset_text_field"]`` when set.

    The recipe's ``chat_template`` file is read here (a missing one is an error), and conversational
    data has the model's tokenizer (only the tokenizer) loaded to check it has a template (the recipe's, or its
    own) and that the template renders the rows (:func:`check_template_renders`), so that these errors come
    before the model loads (before, a refusal came after the weights loaded).
    """
    if recipe.chat_template is not None:
        read_chat_template(recipe.chat_template)
    if recipe.dataset is None:
        return None
    text_field = (recipe.training_args or {}).get("dataset_text_field", "text")
    data = load_train_data(recipe.dataset, recipe.trainer, eval_dataset=recipe.eval_dataset,
                           eval_split=recipe.eval_split, seed=recipe.seed, text_field=text_field)
    if recipe.model is None:
        check_embedded_alphabet(data, source=str(recipe.dataset))
    if data.format.conversational:  # the template's refusals too, before the model loads (its tokenizer only)
        tokenizer = _tokenizer_of(recipe.model)
        if recipe.chat_template is not None:
            tokenizer.chat_template = read_chat_template(recipe.chat_template)
        ensure_chat_template(tokenizer, data.format, None, model=recipe.model, source=str(recipe.dataset))
        check_template_renders(tokenizer, data, source=str(recipe.dataset),
                               eval_source=str(recipe.eval_dataset or "eval_split"))
    check_loss_fields(recipe, data)
    return data


def check_loss_fields(recipe: Any, data: TrainData) -> None:
    """SFTConfig's loss-masking fields against the data they mask (SFT on a ``dataset``), before the model loads.

    * ``completion_only_loss: true`` on data without a completion (``text``, ``messages``): TRL applies it to
      prompt-completion rows only and trained on every token of these (a ``messages`` row's system prompt and user
      turns included) without a word. Refused unless ``assistant_only_loss: true`` masks the rows instead.
    * ``assistant_only_loss: true`` on standard data: TRL's ``ValueError`` came after the model loaded.
    * ``assistant_only_loss: true`` with a row that has no assistant message (every row of the training and eval data,
      from Arrow's role lists): TRL stopped after the model loaded with a ``RuntimeError`` traceback that blamed the
      template ("it may be missing the {% generation %} keyword").

    Raises:
        ConfigError: Naming the field, the data's format or the rows (their lines for JSON Lines) and the fix.
    """
    from .config import ConfigError

    ta = getattr(recipe, "training_args", None) or {}
    if recipe.trainer != "sft" or data is None:
        return
    fmt, source = data.format, str(recipe.dataset)
    assistant = ta.get("assistant_only_loss") is True
    if ta.get("completion_only_loss") is True and fmt.name != "prompt-completion" and not assistant:
        fix = ("set assistant_only_loss: true for the loss on the assistant turns only (the chat template marks them "
               "with {% generation %})" if fmt.conversational else "write the rows as prompt + completion columns")
        raise ConfigError(f"completion_only_loss=true applies to prompt-completion data (columns 'prompt' and "
                          f"'completion') only, and {source} is {fmt.describe()}: TRL would train on every token of it "
                          f"without a word; {fix}, or drop completion_only_loss")
    if not assistant:
        return
    if not fmt.conversational:
        instead = ("completion_only_loss (on by default for prompt-completion data) trains on the completions only"
                   if fmt.name == "prompt-completion" else "write the rows as messages or as prompt + completion")
        raise ConfigError(f"assistant_only_loss=true needs conversational data (lists of role/content messages, the "
                          f"assistant turns marked by the chat template), and {source} is {fmt.describe()}; "
                          f"drop assistant_only_loss: {instead}")
    for rows, where in ((data.train, source), (data.eval, str(recipe.eval_dataset or "eval_split"))):
        if rows is None:
            continue
        roles = [sum(seqs, ()) for seqs in zip(*(_role_sequences(rows, c) for c in fmt.columns))]
        missing = [i for i, r in enumerate(roles) if "assistant" not in r]
        if missing:
            named = ", ".join(f"{_row_where(where, i)} (roles {list(roles[i])})" for i in missing[:3])
            raise ConfigError(f"assistant_only_loss=true: {len(missing)} row{'s' if len(missing) > 1 else ''} of {where} "
                              f"{'have' if len(missing) > 1 else 'has'} no assistant message, so nothing of "
                              f"{'them' if len(missing) > 1 else 'it'} would be trained (TRL stops on such a row after "
                              f"the model loaded): row{'s' if len(missing) > 1 else ''} {named}"
                              f"{', ...' if len(missing) > 3 else ''}; add the assistant's answer, remove those rows, "
                              "or drop assistant_only_loss")


def _texts(value: Any) -> list[str]:
    """The strings of one format cell: a string, or the ``content`` of each message of a conversational one."""
    if isinstance(value, str):
        return [value]
    return [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)] \
        if isinstance(value, list) else []


def check_embedded_alphabet(data: TrainData, *, source: str = "dataset") -> None:
    """The embedded tiny model's character tokenizer (:data:`lowmem.kit.tokenizer.ALPHABET`: digits, lowercase
    letters, space, ASCII punctuation) covers the data's format columns, over every row of the training and
    eval sets (before: the first 1,000). Any other character (a capital, a newline, ...) would be encoded
    as ``<unk>`` without a word: a run on a user's dataset without ``model`` trained on them.

    Raises:
        ValueError: Naming the characters found outside the alphabet, their count, and the fix (``model``).
    """
    from collections import Counter

    from lowmem.kit.tokenizer import ALPHABET

    allowed, outside = set(ALPHABET), Counter()
    for ds in (data.train, data.eval):
        if ds is None:
            continue
        for start in range(0, len(ds), ROW_BATCH):
            batch = ds.select_columns(list(data.format.columns))[start:start + ROW_BATCH]
            for column in data.format.columns:
                for value in batch[column]:
                    for text in _texts(value):
                        for ch in set(text) - allowed:
                            outside[ch] += text.count(ch)
    if outside:
        shown = [ch for ch, _ in outside.most_common(10)]
        raise ValueError(f"{source}: no model is given, and the embedded tiny model's character tokenizer ({len(ALPHABET)} "
                         "characters: digits, lowercase letters, space, ASCII punctuation) lacks "
                         f"{sum(outside.values())} characters of this data ({len(outside)} kinds, e.g. {shown}): they "
                         "would train as <unk>. Give your model (--model DIR, or model: in the recipe), or keep the data "
                         "to that alphabet")


def _tokenizer_of(model: str | None):
    """The tokenizer of a local model directory (``None``: the embedded tiny model's)."""
    if model is None:
        from lowmem.kit import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    if not Path(model).is_dir():
        raise FileNotFoundError(f"model path {model!r} is not a local directory (lowmem never downloads models)")
    return AutoTokenizer.from_pretrained(model, local_files_only=True)


def check_tokenizer_fits(tokenizer, model: str) -> None:
    """The tokenizer of a user's model directory can train it: it has an ``eos_token`` and no special token
    beyond the model's embedding rows.

    A ``tokenizer.json`` saved with the ``tokenizers`` library alone (no ``tokenizer_config.json``) names no
    special tokens: transformers then either gives none (``TokenizersBackend``: no eos, no pad; TRL's DPO failed
    with "The specified `pad_token` ('None') is not found", GRPO/BNPO with ``TypeError: full(): argument
    'fill_value' ... NoneType`` at the first step, and GRPO would not know where a completion ends) or adds its
    class defaults as new tokens (``GemmaTokenizer``: ``<bos>``, ``<eos>``, ``<pad>`` at ids 300-303 of a
    300-row embedding; ``GPTNeoXTokenizer``: ``<|padding|>``), which failed mid-training with ``IndexError: index
    out of range in self``. Both are errors here, before training, naming the tokens and the fix; the model's
    ``config.json`` ``eos_token_id`` is named as the eos to write.

    Args:
        tokenizer: The loaded tokenizer (after ``pad_token = eos_token`` where it had no pad token).
        model (`str`): The model directory (its ``config.json`` gives the embedding rows, ``vocab_size``).

    Raises:
        ValueError: Naming the directory, the tokenizer class, the tokens and what to write.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
    except (OSError, ValueError):
        config = None
    rows = getattr(config, "vocab_size", None)
    eos_id = getattr(config, "eos_token_id", None)
    eos_id = eos_id[0] if isinstance(eos_id, (list, tuple)) and eos_id else eos_id
    cls = type(tokenizer).__name__
    eos = (tokenizer.convert_ids_to_tokens(eos_id) if isinstance(eos_id, int) and isinstance(rows, int)
           and 0 <= eos_id < min(rows, len(tokenizer)) else None)
    fix = ("save the tokenizer with its special tokens, which also sets tokenizer_config.json's tokenizer_class: "
           f"PreTrainedTokenizerFast(tokenizer_file={str(Path(model) / 'tokenizer.json')!r}, "
           f"eos_token={eos if eos is not None else '...'!r}).save_pretrained({str(model)!r})"
           + (f" ({eos!r} is config.json's eos_token_id {eos_id}" if eos is not None else " (")
           + "; add pad_token=... if your vocabulary has one)")
    if tokenizer.eos_token is None:
        raise ValueError(f"model={model!r}: its tokenizer ({cls}) has no eos_token (its files name no special "
                         "tokens): TRL ends every sequence with it, pads with it when there is no pad_token, and GRPO "
                         f"stops generating at it; {fix}")
    if isinstance(rows, int):
        specials = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token",
                                                                  "sep_token", "cls_token", "mask_token")}
        beyond = {name: (tok, tokenizer.convert_tokens_to_ids(tok)) for name, tok in specials.items()
                  if isinstance(tok, str) and tokenizer.convert_tokens_to_ids(tok) is not None
                  and tokenizer.convert_tokens_to_ids(tok) >= rows}
        if beyond:
            named = ", ".join(f"{name} {tok!r} (id {i})" for name, (tok, i) in beyond.items())
            raise ValueError(f"model={model!r}: its tokenizer ({cls}, {len(tokenizer)} tokens) has special tokens beyond "
                             f"the model's {rows} embedding rows (config.json vocab_size): {named}; every batch would "
                             f"index past the embedding (IndexError: index out of range in self). {cls} adds its "
                             f"default special tokens when the tokenizer files do not name them: {fix}; or resize the "
                             "model's embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))) and "
                             "save both")


def prepare_tokenizer(recipe: Any, data: TrainData | None, tokenizer) -> None:
    """Set the recipe's ``chat_template`` on ``tokenizer`` and check that conversational data has one
    (:func:`ensure_chat_template`); nothing to do for the synthetic task without ``chat_template``.
    A user's model directory's tokenizer is checked first (:func:`check_tokenizer_fits`)."""
    if recipe.model is not None:
        check_tokenizer_fits(tokenizer, recipe.model)
    if data is None:
        if recipe.chat_template is not None:
            tokenizer.chat_template = read_chat_template(recipe.chat_template)
        return
    ensure_chat_template(tokenizer, data.format, recipe.chat_template, model=recipe.model, source=str(recipe.dataset))
    check_template_renders(tokenizer, data, source=str(recipe.dataset), eval_source=str(recipe.eval_dataset or "eval_split"))


def format_notes(data: TrainData, tokenizer, source: str = "dataset") -> list[str]:
    """What the data's format leaves out, without an error (``lowmem train`` prints each as a ``note:`` line):

    * standard (string) prompt-completion, preference or prompt-only rows beside a tokenizer with a chat template:
      TRL renders only conversational rows with the template, so the model trains (or generates, GRPO) on the bare
      strings, not in the turns it is prompted with at inference (plain ``text`` rows are language modeling: no note);
    * a ``tools`` or system-prompt column (:data:`SYSTEM_COLUMNS`) in GRPO / GVPO / BNPO data: TRL 1.16's GRPO renders
      the ``prompt`` alone (tools only from the trainer's ``tools`` callables); the column reaches the reward functions
      only.
    """
    fmt, notes = data.format, []
    if not fmt.conversational and fmt.name != "text" and getattr(tokenizer, "chat_template", None):
        notes.append(f"{source} is {fmt.describe()}: strings, so the tokenizer's chat template is not applied to them "
                     "(TRL renders only conversational rows, lists of {role, content} messages, with it) and the model "
                     "trains on the bare text, not in the chat turns it is prompted with at inference; write the "
                     "columns as messages to train in the chat format")
    unseen = [c for c in fmt.extra_columns if c == "tools" or c.strip().lower() in SYSTEM_COLUMNS]
    if fmt.columns == ("prompt",) and unseen:
        notes.append(f"{source}'s column(s) {unseen} reach the reward functions only: TRL's GRPO renders a row's "
                     "'prompt' alone (no tools, no system column), so the model does not see them; put a system prompt "
                     "first in the prompt messages")
    return notes


def dpo_eval_rows(data: TrainData, n: int = 64):
    """DPO's evaluation rows for ``metrics.json``: the eval set, else the first ``n`` training pairs."""
    return data.eval if data.eval is not None else data.train.select(range(min(n, len(data.train))))
