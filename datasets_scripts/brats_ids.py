"""Case ids across BraTS releases: which ids name the same patient, its BraTS 2020 id and grade.

Each BraTS release renames its cases, while reports (TextBraTS) are keyed by BraTS 2020 ids
(``BraTS20_Training_XXX``). The organisers publish tables that link the names (BraTS 2020
``name_mapping*.csv``, BraTS 2021 ``BraTS21-17_Mapping.csv``); :class:`IdMapping` reads them in any
mix and answers look-ups by any of the names. The releases and their id rules come from the release
table (``modeling_emrfuse.brats_io.RELEASES``); the README (``--id_mapping``) says how a run uses them.

Example::

    ids = IdMapping.from_files(find_id_tables("/data/MICCAI_BraTS2020_TrainingData"))
    ids.brats2020_id("Brats18_2013_2_1")   # 'BraTS20_Training_136'
    ids.grade_of("TCGA-DU-7294")           # 'LGG'
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from modeling_emrfuse.brats_io import RELEASES, earlier_release_id

__all__ = [
    "GRADES",
    "MISSING_VALUES",
    "TABLE_PATTERNS",
    "IdMapping",
    "find_id_tables",
    "gli_to_brats2021",
]

#: Grades a ``Grade`` column may hold (upper-cased before checking).
GRADES: Tuple[str, ...] = ("HGG", "LGG")

#: Cell values (compared upper-cased, after stripping whitespace) that mean "no id here"; an empty cell
#: is not an id either.
MISSING_VALUES: FrozenSet[str] = frozenset({"", "NA", "N/A"})

#: File-name patterns of id tables, matched (case-sensitively) by :func:`find_id_tables`.
TABLE_PATTERNS: Tuple[str, ...] = ("name_mapping*.csv", "*Mapping*.csv")


_EXPECTED = (
    "a BraTS 2020 name mapping (Grade, BraTS_2017_subject_ID, BraTS_2018_subject_ID, "
    "TCGA_TCIA_subject_ID, BraTS_2019_subject_ID, BraTS_2020_subject_ID; Grade optional) or a "
    "BraTS 2021 mapping (BraTS2021, BraTS2020, BraTS2019, BraTS2018, BraTS2017, ...)"
)


def gli_to_brats2021(case_id: str) -> Optional[str]:
    """The earlier-release id a case id continues, by the release table's ``earlier_id`` rules
    (:func:`modeling_emrfuse.brats_io.earlier_release_id`).

    Args:
        case_id: A case id such as ``BraTS-GLI-00005-001``.

    Returns:
        ``BraTS2021_NNNNN`` for ``BraTS-GLI-NNNNN-TTT`` (any timepoint ``TTT``), else ``None``.
        Whether that case exists is not checked.
    """
    return earlier_release_id(case_id)


def _is_release_column(name: str) -> bool:
    """A column named after a release of the release table (``BraTS2017`` ... ``BraTS2021``)."""
    text = name.strip().lower()
    return text.startswith("brats") and text[len("brats") :] in RELEASES


def find_id_tables(data_dir: Union[str, Path]) -> List[Path]:
    """The id tables directly inside a data folder (not its sub-folders).

    Matches ``name_mapping*.csv`` (BraTS 2020, training and validation) and ``*Mapping*.csv``
    (``BraTS21-17_Mapping.csv``); hidden files (``._name_mapping.csv``) are skipped.

    Args:
        data_dir: The folder to look in, e.g. a BraTS 2020 training folder.

    Returns:
        The matching files, sorted by name (possibly empty).

    Raises:
        FileNotFoundError: ``data_dir`` does not exist.
        NotADirectoryError: ``data_dir`` is not a folder.
    """
    folder = Path(data_dir)
    if not folder.exists():
        raise FileNotFoundError(f"Data folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"Not a folder: {folder}")
    found = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".")
        and any(fnmatchcase(p.name, pattern) for pattern in TABLE_PATTERNS)
        and p.is_file()
    ]
    return sorted(found, key=lambda p: p.name)


@dataclass(frozen=True)
class _Row:
    """One table row: its ids, BraTS 2020 id, grade and where it came from (``file:line``)."""

    ids: Tuple[str, ...]
    brats2020: Optional[str]
    grade: Optional[str]
    where: str


@dataclass(frozen=True)
class _Patient:
    key: str
    aliases: FrozenSet[str]
    brats2020: Optional[str]
    grade: Optional[str]


def _cell(value: object) -> Optional[str]:
    """A stripped id cell, or ``None`` for missing values (``NA``, ``N/A``, empty, absent)."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text.upper() in MISSING_VALUES else text


def _columns(header: Sequence[str], source: str) -> Tuple[List[str], Optional[str], Optional[str]]:
    """Detect the table kind: (id columns, the BraTS 2020 id column, the grade column).

    Column names are compared stripped of whitespace (the 2021 table's ``Local ID `` has a trailing
    space). Two kinds are understood:

    * **BraTS 2020 name mapping** (``name_mapping.csv``, 369 training cases)::

          Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,BraTS_2020_subject_ID
          LGG,Brats17_TCIA_130_1,Brats18_TCIA10_130_1,TCGA-DU-7294,BraTS19_TCIA10_130_1,BraTS20_Training_295

      Recognised by a column whose name contains ``subject_id``. Every column whose name contains
      ``subject_id`` (any case) or ``ID``, or is ``id`` / ``case_id``, is an id column; the one
      containing ``2020`` gives the BraTS 2020 id. The validation version
      (``name_mapping_validation_data.csv``) has no ``Grade`` column and ``BraTS20_Validation_XXX``
      ids; the grade is read only where a ``Grade`` column exists (``HGG`` or ``LGG``).

    * **BraTS 2021 mapping** (``BraTS21-17_Mapping.csv``)::

          BraTS2021,BraTS2020,BraTS2019,BraTS2018,BraTS2017,Cohort Name (if publicly available),Site No (represents the originating institution),Local ID

      Recognised by columns named ``BraTS<release>`` for releases of the release table; only those are
      id columns (cohort, site and local-id columns are ignored). Some rows have no 2021 id but a
      BraTS 2020 id.
    """
    names = [name for name in header if isinstance(name, str)]
    stripped = {name: name.strip() for name in names}
    release_cols = [name for name in names if _is_release_column(stripped[name])]
    if release_cols:  # BraTS 2021 mapping
        id_cols = release_cols
    elif any("subject_id" in stripped[name].lower() for name in names):  # BraTS 2020 name mapping
        id_cols = [
            name
            for name in names
            if "subject_id" in stripped[name].lower()
            or "ID" in stripped[name]
            or stripped[name].lower() in ("id", "case_id")
        ]
    else:
        shown = ", ".join(repr(stripped[name]) for name in names) or "none"
        raise ValueError(f"{source}: not a BraTS id table (columns: {shown}); expected {_EXPECTED}.")

    def squash(name: str) -> str:
        return re.sub(r"[^a-z0-9]", "", name.lower())

    col2020 = next((name for name in id_cols if "brats2020" in squash(name)), None)
    if col2020 is None:
        col2020 = next((name for name in id_cols if "2020" in name), None)
    grade_col = next((name for name in names if stripped[name].lower() == "grade"), None)
    return id_cols, col2020, grade_col


def _parse(header: Sequence[str], rows: Iterable[Tuple[int, Mapping[str, object]]], source: str) -> List[_Row]:
    """Parse ``(line number, row)`` pairs of one table."""
    id_cols, col2020, grade_col = _columns(header, source)
    parsed: List[_Row] = []
    for line, row in rows:
        ids: List[str] = []
        for column in id_cols:
            value = _cell(row.get(column))
            if value is not None and value not in ids:
                ids.append(value)
        if not ids:
            continue
        where = f"{source}:{line}"
        grade = None
        if grade_col is not None:
            raw = row.get(grade_col)
            grade = None if raw is None or str(raw).strip().upper() in MISSING_VALUES else str(raw).strip().upper()
            if grade is not None and grade not in GRADES:
                raise ValueError(f"{where}: the Grade of ids {', '.join(ids)} is not one of {', '.join(GRADES)}.")
        brats2020 = _cell(row.get(col2020)) if col2020 is not None else None
        parsed.append(_Row(tuple(ids), brats2020, grade, where))
    return parsed


def _read_table(path: Path) -> List[_Row]:
    """The rows of one CSV id table (a UTF-8 byte-order mark is ignored); line numbers as in the file."""
    if not path.exists():
        raise FileNotFoundError(f"BraTS id table not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"BraTS id table is a folder, not a CSV file: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header or not any(name.strip() for name in header):
            raise ValueError(f"{path}: empty BraTS id table (no header line); expected {_EXPECTED}.")
        # DictReader skips blank lines, so line numbers come from the reader itself.
        rows = [(reader.line_num, row) for row in reader]
    return _parse(header, rows, str(path))


@dataclass
class IdMapping:
    """Which case ids name the same patient across BraTS releases, and each patient's BraTS 2020 id and grade.

    Build one with :meth:`from_files` (the organisers' CSV tables; the kinds understood are listed on
    :func:`_columns`) or :meth:`from_rows`; combine mappings with :meth:`merge`. The joining rules:

    * All ids of one row name one patient; rows (of any tables) that share an id are the same patient
      (connected components over ids), so with both tables ``BraTS2021_01500`` ->
      ``BraTS20_Training_295`` -> ``Brats18_TCIA10_130_1`` / ``TCGA-DU-7294`` are one patient.
    * The patient key (:meth:`patient_of`) is the patient's BraTS 2020 id when a table gives one, else
      the smallest of its ids in sorted order: deterministic and shared by every alias.
    * Look-ups are exact on the stripped id string. The release table's ``earlier_id`` rules are
      applied on top of the tables: the glioma ids ``BraTS-GLI-NNNNN-TTT`` continue the BraTS 2021
      numbering, so any timepoint ``TTT`` of ``BraTS-GLI-NNNNN`` is the patient of ``BraTS2021_NNNNN``
      -- used only when that 2021 id is in a table (otherwise the id is unknown and look-ups return
      ``None``).
    * A patient with two different grades, or two different BraTS 2020 ids joined into one patient (a
      broken table), is a ``ValueError`` naming the files, lines and ids. Error messages never show
      cell values other than ids.

    Attributes:
        files: The tables read (file paths, or the ``source`` names given to :meth:`from_rows`).
    """

    files: List[str] = field(default_factory=list)
    _rows: List[_Row] = field(default_factory=list, repr=False)
    _patient_by_id: Dict[str, str] = field(init=False, repr=False, compare=False)
    _patients: Dict[str, _Patient] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._build()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_files(cls, paths: Union[str, Path, Sequence[Union[str, Path]]]) -> "IdMapping":
        """Read id tables of either kind (detected from each file's header).

        Args:
            paths: CSV files (``name_mapping*.csv``, ``BraTS21-17_Mapping.csv``), in any mix; a
                single path is accepted too.

        Returns:
            The joined mapping.

        Raises:
            FileNotFoundError: A file is missing (the message names it).
            ValueError: A file is empty, its header is not a known kind (the message names the file
                and the expected columns), a grade is not HGG/LGG, or the tables conflict.
        """
        if isinstance(paths, (str, Path)):
            paths = [paths]
        files: List[str] = []
        rows: List[_Row] = []
        for path in paths:
            path = Path(path)
            rows.extend(_read_table(path))
            files.append(str(path))
        return cls(files=files, _rows=rows)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, str]], *, source: str = "<rows>") -> "IdMapping":
        """Same parsing as :meth:`from_files` on dict rows (the keys of the first row are the header).

        Args:
            rows: Rows as ``{column: value}`` mappings, all of one table kind.
            source: The name used for the table in :attr:`files` and in error messages; lines are
                counted from 2 as in a CSV file.

        Returns:
            The mapping (empty when there are no rows).

        Raises:
            ValueError: Unknown header kind, a grade not HGG/LGG, or conflicting rows.
        """
        rows = list(rows)
        parsed = _parse(list(rows[0].keys()), enumerate(rows, start=2), source) if rows else []
        return cls(files=[source], _rows=parsed)

    def merge(self, other: "IdMapping") -> "IdMapping":
        """A new mapping holding the tables of both (rows sharing an id are joined).

        Raises:
            ValueError: The combined tables conflict (grades or BraTS 2020 ids).
        """
        if not isinstance(other, IdMapping):
            raise TypeError(f"can only merge another IdMapping, not {type(other).__name__}")
        return IdMapping(files=self.files + other.files, _rows=self._rows + other._rows)

    def _build(self) -> None:
        parent: Dict[str, str] = {}

        def find(x: str) -> str:
            parent.setdefault(x, x)
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for row in self._rows:
            root = find(row.ids[0])
            for other in row.ids[1:]:
                other_root = find(other)
                if other_root != root:
                    parent[other_root] = root

        members: Dict[str, Set[str]] = {}
        for id_ in parent:
            members.setdefault(find(id_), set()).add(id_)
        rows_of: Dict[str, List[_Row]] = {}
        for row in self._rows:
            rows_of.setdefault(find(row.ids[0]), []).append(row)

        patient_by_id: Dict[str, str] = {}
        patients: Dict[str, _Patient] = {}
        for root, ids in members.items():
            rows = rows_of[root]
            brats2020 = _agree(rows, "brats2020", "two different BraTS 2020 ids are joined into one patient")
            grade = _agree(rows, "grade", "one patient has two different grades")
            key = brats2020 if brats2020 is not None else min(ids)
            patients[key] = _Patient(key, frozenset(ids), brats2020, grade)
            for id_ in ids:
                patient_by_id[id_] = key
        self._patient_by_id = patient_by_id
        self._patients = patients

    # -- look-ups ------------------------------------------------------------------------------

    def _patient(self, case_id: str) -> Optional[_Patient]:
        if not isinstance(case_id, str):
            return None
        text = case_id.strip()
        key = self._patient_by_id.get(text)
        if key is None:
            alias = gli_to_brats2021(text)
            key = self._patient_by_id.get(alias) if alias is not None else None
        return self._patients[key] if key is not None else None

    def patient_of(self, case_id: str) -> Optional[str]:
        """A stable patient key shared by every alias of ``case_id``.

        Args:
            case_id: Any case id (stripped before the exact look-up; ``BraTS-GLI-NNNNN-TTT`` also
                resolves through ``BraTS2021_NNNNN``).

        Returns:
            The patient's BraTS 2020 id if it has one, else its smallest id in sorted order;
            ``None`` for an unknown id.
        """
        patient = self._patient(case_id)
        return patient.key if patient else None

    def brats2020_id(self, case_id: str) -> Optional[str]:
        """The ``BraTS20_Training_XXX`` (or ``BraTS20_Validation_XXX``) id of the patient, if any table gives one."""
        patient = self._patient(case_id)
        return patient.brats2020 if patient else None

    def grade_of(self, case_id: str) -> Optional[str]:
        """``"HGG"`` / ``"LGG"`` from a ``Grade`` column, else ``None`` (also for unknown ids)."""
        patient = self._patient(case_id)
        return patient.grade if patient else None

    def aliases(self, case_id: str) -> Set[str]:
        """Every id naming the patient of ``case_id``, including ``case_id`` itself (stripped).

        An unknown id gives ``{case_id}``; a missing value (``""``, ``NA``, ``N/A``) gives ``set()``.
        """
        text = _cell(case_id) if isinstance(case_id, str) else None
        if text is None:
            return set()
        patient = self._patient(text)
        return (set(patient.aliases) if patient else set()) | {text}

    def __contains__(self, case_id: object) -> bool:
        return isinstance(case_id, str) and self._patient(case_id) is not None

    def __len__(self) -> int:
        """The number of patients."""
        return len(self._patients)


def _agree(rows: List[_Row], attribute: str, problem: str) -> Optional[str]:
    """The single non-missing value of ``attribute`` over a patient's rows, or a ValueError."""
    seen: Dict[str, _Row] = {}
    for row in rows:
        value = getattr(row, attribute)
        if value is not None and value not in seen:
            seen[value] = row
    if len(seen) <= 1:
        return next(iter(seen), None)
    files = sorted({row.where.rsplit(":", 1)[0] for row in rows})
    clashing = "; ".join(f"{row.where} (ids {', '.join(row.ids)})" for row in seen.values())
    raise ValueError(f"{', '.join(files)}: {problem} -- {clashing}. The id tables are inconsistent.")
