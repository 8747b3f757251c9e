"""Hugging Face `datasets` as input: local parquet / arrow / CSV / JSON files, `save_to_disk`
directories and hub ids (`org/name`), read into the seed formats and checked like JSONL.

Why it is built this way:

* **One validation.** Every row becomes a plain dict and goes through the same
  `data.formats.validate` a JSONL line does, so a bad row is the same one-line `DataError`,
  naming the row (`file.parquet:row 3`, the index `dataset[3]` would use) and the field, with the
  dataset column it came from when `data.columns` renamed it. Nothing trains before every row passed.
* **`datasets` is optional.** It is imported only when a non-JSONL source is read; without it the
  error says what to install (`pip install -e ".[hf]"`). JSONL files never come here.
* **Nothing downloads by itself.** A hub id goes through `datasets.load_dataset`, which honours
  `HF_DATASETS_OFFLINE=1` / `HF_HUB_OFFLINE=1` (then only the local cache is read); the tests
  never touch the network.
* **Larger than memory.** `datasets` keeps a dataset as memory-mapped Arrow files on disk. With
  `data.streaming=true` the rows are validated in batches and returned as a lazy view
  (`LazyRows`) that reads each row from the memory-mapped table when it is asked for, so the raw
  rows never sit in Python memory all at once (the feeds still tokenize what they train on).

Which inputs come here (`is_dataset_source`): a path ending .parquet, .arrow, .csv, .tsv or .json,
a `save_to_disk` directory, or a name of the form `org/name` that is not a local file. Everything
else, `.jsonl` first of all, is read by data/formats.py exactly as before.

Options (`configure`, from the run's `data.*`, per eval set from `data.eval.NAME: {path, split,
subset, columns}`): `split` (default `train`), `subset` (the dataset's config name), `columns`
(`{seed_field: dataset_column}`, e.g. `{prompt: question, answer: final_answer}`), `streaming`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence

EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".json": "json"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
SOURCE_KEYS = ("split", "subset", "columns", "streaming")  # per-source options (data.eval entries may set them)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
BATCH = 1000  # rows converted to Python at a time while validating

DEFAULTS = {"split": "train", "subset": None, "columns": {}, "streaming": False}
_options: dict = dict(DEFAULTS)          # the run's data.* options (configure)
_per_path: dict[str, dict] = {}          # options of one source (an eval set's own split/columns)


def configure(data=None, sources: dict | None = None, **options) -> None:
    """Set the options every dataset source is read with: the run's `data` options (split,
    subset, columns, streaming; or the same as keywords) and, in `sources`, `{path: {split, subset,
    columns}}` for sources with their own (held-out sets). Called once per process by
    trainer/run.py `setup`; with no arguments it restores the defaults."""
    global _options
    _options = dict(DEFAULTS)
    if data is not None:
        _options.update({k: getattr(data, k) for k in DEFAULTS if getattr(data, k, None) is not None})
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"configure: unknown option(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    _options.update(options)
    _per_path.clear()
    for path, opts in (sources or {}).items():
        _per_path[str(path)] = {k: v for k, v in opts.items() if k in SOURCE_KEYS}


def options_for(path: str) -> dict:
    return {**_options, **_per_path.get(str(path), {})}


def is_dataset_source(path) -> bool:
    """Whether `path` is read through `datasets` (see the module docstring for the rule)."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        return False
    if path.endswith(".jsonl"):
        return False
    if os.path.splitext(path)[1].lower() in EXTENSIONS:
        return True
    if os.path.isdir(path):
        return any(os.path.exists(os.path.join(path, m)) for m in DISK_MARKERS)
    return not os.path.exists(path) and bool(HUB_ID.fullmatch(path)) and ".." not in path


class RowNo(int):
    """A row index that prints as `row N`, so `f"{path}:{n}"` in shared messages reads `file:row N`."""

    def __str__(self):
        return f"row {int(self)}"

    def __format__(self, spec):
        return str(self) if not spec else int.__format__(int(self), spec)


def _datasets():
    try:
        import datasets
    except ImportError:  # a ValueError: train.py prints it as one line
        raise ValueError("reading parquet / arrow / CSV / JSON files and hub datasets needs the `datasets` "
                          "package: pip install -e \".[hf]\" (JSONL files need nothing)") from None
    datasets.disable_progress_bars()
    return datasets


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def open_dataset(path: str, split: str = "train", subset: str | None = None):
    """The `datasets.Dataset` of one source and split, memory-mapped from disk; DataError otherwise."""
    from data.formats import DataError, shown_path

    shown = shown_path(path)
    ds_lib = _datasets()
    ext = os.path.splitext(path)[1].lower()
    try:
        if os.path.isdir(path):
            ds = ds_lib.load_from_disk(path)
        elif ext in EXTENSIONS:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{shown}: data file not found")
            if not os.path.isfile(path):
                raise DataError(f"{shown}: expected a {EXTENSIONS[ext]} file, got something else", "file")
            kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
            ds = ds_lib.load_dataset(EXTENSIONS[ext], data_files={"train": path}, **kwargs)
        else:  # a hub id; offline mode is honoured by datasets itself
            ds = ds_lib.load_dataset(path, subset)
    except (FileNotFoundError, DataError):
        raise
    except Exception as e:  # datasets raises many kinds (ValueError, ArrowInvalid, DatasetNotFoundError ...)
        what = "dataset" if ext not in EXTENSIONS else f"{EXTENSIONS[ext]} file"
        raise DataError(f"{shown}: cannot read the {what} ({_first_line(e)})", "file") from None
    if isinstance(ds, ds_lib.DatasetDict):
        if split not in ds:
            raise DataError(f"{shown}: no split {split!r} (data.split); the dataset has {', '.join(sorted(ds))}",
                            "file")
        ds = ds[split]
    return ds


def _renamer(columns: dict, names: list[str], shown: str):
    """row -> row with each mapped dataset column under its seed-format name; errors for missing columns."""
    from data.formats import DataError

    for field, col in columns.items():
        if col not in names:
            raise DataError(f"{shown}: data.columns.{field}: no column {col!r} in the dataset; its columns: "
                            f"{', '.join(names)}", "file")
    if not columns:
        return lambda row: row
    moved = set(columns.values())

    def rename(row: dict) -> dict:
        out = {k: v for k, v in row.items() if k not in moved}
        out.update({field: row[col] for field, col in columns.items()})
        return out
    return rename


_FIELD = re.compile(r"field '([^'\[.]+)")


def _name_column(e, columns: dict):
    """The DataError with the dataset column named beside a renamed field."""
    from data.formats import DataError

    m = _FIELD.search(str(e))
    if not m or m.group(1) not in columns:
        return e
    text = str(e)
    end = text.index("'", m.end()) + 1
    return DataError(f"{text[:end]} (column {columns[m.group(1)]!r}){text[end:]}", e.kind, e.line)


class LazyRows(Sequence):
    """Rows of a memory-mapped dataset, each read (and renamed) when indexed: `data.streaming=true`."""

    def __init__(self, ds, rename, index=None):
        self.ds, self.rename = ds, rename
        self.index = range(len(ds)) if index is None else index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazyRows(self.ds, self.rename, self.index[i])
        return self.rename(self.ds[int(self.index[i])])


def read_records(path: str, fmt: str, require=(), group_size: int | None = None):
    """data.formats.read_records for a dataset source: (rows, row numbers), every row validated."""
    from data.formats import FORMATS, DataError, group_size_errors, shown_path, validate

    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}")
    opts = options_for(path)
    shown = shown_path(path)
    ds = open_dataset(path, opts["split"], opts["subset"])
    columns = dict(opts["columns"] or {})
    rename = _renamer(columns, list(ds.column_names), shown)
    lazy = bool(opts["streaming"])
    rows, rownos, groups = [], [], []
    i = 0
    for batch in ds.iter(batch_size=BATCH):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            row = rename(dict(zip(names, values)))
            try:
                validate(row, fmt, f"{shown}:{RowNo(i)}", require)
            except DataError as e:
                raise _name_column(e, columns) from None
            if lazy:
                if "responses" in row:
                    groups.append((row, RowNo(i)))
            else:
                rows.append(row)
                rownos.append(RowNo(i))
            i += 1
    if i == 0:
        raise DataError(f"{shown}: expected at least one row of format {fmt!r}, got an empty dataset", "empty")
    if lazy:
        rows, rownos = LazyRows(ds, rename), [RowNo(j) for j in range(i)]
        errors = group_size_errors([r for r, _ in groups], [n for _, n in groups], path, fmt, group_size)
    else:
        errors = group_size_errors(rows, rownos, path, fmt, group_size)
    if errors:
        raise errors[0]
    return rows, rownos


def row_count(path: str, split: str = "train", subset: str | None = None) -> int | None:
    """Rows of a dataset source's split (for lineage.json), None when it cannot be opened."""
    try:
        return len(open_dataset(path, split, subset))
    except Exception:  # lineage records what it can; the run itself reports unreadable data
        return None
