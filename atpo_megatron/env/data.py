"""Question-answering data: FlashRAG files, and a generated knowledge-base task that needs no download.

    examples = load_dataset("hotpotqa/dev.jsonl")            # FlashRAG JSONL or parquet
    corpus, train, test = generate_task("runs/embedded_task", seed=0)
    examples = load_examples(cfg, cfg.data.train_files, "train")   # a config's files ("embedded" included)
    stream = PromptStream(examples, batch_size=4, seed=0)          # the trainer's resumable batches
    python -m atpo_megatron.env.retriever serve --corpus runs/embedded_task/corpus.jsonl

The generated task is a fictional world (people, companies, cities, bridges and buildings) written
as a wiki-18 style passage corpus, with 1-, 2- and 3-hop questions that can only be answered by
searching it ("Who founded the company that built the Varlo Bridge?").
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from atpo_megatron.config import ConfigError, UserError


class DatasetError(UserError, ValueError):
    """A dataset file is missing or has a malformed row (the CLI prints it as one line)."""


@dataclass
class QAExample:
    """One question with its accepted answers."""

    id: str
    question: str
    golden_answers: list[str]
    data_source: str


# ----------------------------------------------------------------------------------------------
# Loading FlashRAG / verl files

_HINT = (
    'expected FlashRAG rows {"id", "question", "golden_answers": [...], "data_source"} or verl rows '
    'with "prompt" and "reward_model": {"ground_truth": {"target": [...]}}'
)


def load_dataset(path: str | os.PathLike[str], data_source: str | None = None) -> list[QAExample]:
    """Read a FlashRAG JSONL (``.jsonl``/``.json``) or parquet file.

    Each row needs a question (``question``, or the question part of a verl ``prompt``) and golden
    answers (``golden_answers``, or verl's ``reward_model.ground_truth.target``). ``id`` defaults to
    ``<file stem>-<row>``; ``data_source`` to the row's field, then the argument, then the file
    stem. Errors name the file and line (JSONL) or row (parquet).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {path} does not exist or is not a file")
    source = data_source or path.stem
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [_example(row, f"{path} row {i}", f"{path.stem}-{i}", source) for i, row in enumerate(rows)]
    if path.suffix not in (".jsonl", ".json"):
        raise DatasetError(f"dataset {path}: unknown format {path.suffix!r}; use .jsonl or .parquet")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: invalid JSON ({exc.msg}); {_HINT}") from None
            examples.append(_example(row, where, f"{path.stem}-{lineno}", source))
    if not examples:
        raise DatasetError(f"dataset {path} has no rows; {_HINT}")
    return examples


def _example(row: Any, where: str, default_id: str, default_source: str) -> QAExample:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object; {_HINT}")
    question = row.get("question")
    if question is None:
        question = _question_from_prompt(row.get("prompt"))
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: no question; {_HINT}")
    golden = row.get("golden_answers")
    if golden is None:
        golden = ((row.get("reward_model") or {}).get("ground_truth") or {}).get("target")
    if isinstance(golden, str):
        golden = [golden]
    if not isinstance(golden, list) or not golden or not all(isinstance(g, (str, int, float)) for g in golden):
        raise DatasetError(f"{where}: golden answers must be a non-empty list of strings, got {golden!r}; {_HINT}")
    row_id = row.get("id")
    return QAExample(
        id=default_id if row_id is None else str(row_id),
        question=question.strip(),
        golden_answers=[str(g) for g in golden],
        data_source=str(row.get("data_source") or default_source),
    )


def _question_from_prompt(prompt: Any) -> str | None:
    """The question at the end of a verl prompt (after "\\nuser\\n", or the paper's literal "\\\\nuser\\\\n")."""
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict):
        return None
    content = prompt[-1].get("content")
    if not isinstance(content, str):
        return None
    for marker in ("\nuser\n", "\\nuser\\n"):
        if marker in content:
            return content.rsplit(marker, 1)[1]
    return content


# ----------------------------------------------------------------------------------------------
# The generated knowledge-base task

GENERATOR_VERSION = 2

_ONSETS = "b br d dr f g gr h k kr l m n p r s sh t th tr v z".split()
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
_CODAS = ["", "", "l", "n", "r", "s", "nd", "rk", "x"]
_COMPANY_SUFFIXES = ["Industries", "Works", "Engineering", "Holdings", "Group", "Construction", "Materials"]
_STRUCTURES = {  # kind -> description template
    "Bridge": "road bridge across the {river}",
    "Tower": "{floors}-storey office tower",
    "Hall": "concert hall near the {river}",
    "Viaduct": "railway viaduct over the {river} valley",
    "Library": "public library with a copper roof",
    "Stadium": "football stadium with {seats} seats",
}
_INDUSTRIES = ["steel", "cement", "glass", "timber", "shipbuilding", "rail engineering", "electrical"]
_FIELDS = ["civil engineering", "economics", "chemistry", "architecture", "law", "mathematics"]
_JOBS = ["surveyor", "accountant", "site engineer", "banker", "draughtsman", "lecturer"]
_MONTHS = ["March", "April", "May", "June", "September", "October"]

_QUESTIONS = {  # data_source -> (template, hop chain); {S} structure, {C} company
    "gen-1hop": [
        ("Who founded {C}?", ("founder",)),
        ("Who is the chief executive of {C}?", ("ceo",)),
        ("In which city is {C} headquartered?", ("hq",)),
        ("In which city was {P} born?", ("born",)),
        ("Which company built the {S}?", ("builder",)),
        ("In which city is the {S}?", ("site",)),
    ],
    "gen-2hop": [
        ("Who founded the company that built the {S}?", ("builder", "founder")),
        ("Who is the chief executive of the company that built the {S}?", ("builder", "ceo")),
        ("In which city is the company that built the {S} headquartered?", ("builder", "hq")),
        ("In which city was the founder of {C} born?", ("founder", "born")),
        ("In which city was the chief executive of {C} born?", ("ceo", "born")),
    ],
    "gen-3hop": [
        ("In which city was the founder of the company that built the {S} born?", ("builder", "founder", "born")),
        ("In which city was the chief executive of the company that built the {S} born?", ("builder", "ceo", "born")),
    ],
}
# relation -> (subject kind, search query template for the hop); the object is an entity name.
_RELATIONS = {
    "founder": ("company", "{} founded by"),
    "ceo": ("company", "{} chief executive"),
    "hq": ("company", "{} headquartered"),
    "born": ("person", "{} born"),
    "builder": ("structure", "{} built by"),
    "site": ("structure", "{}"),
}


class TaskFiles(NamedTuple):
    """Paths written by ``generate_task``."""

    corpus: Path
    train: Path
    test: Path


class _World:
    """The fictional knowledge base: entities, facts, and the passages stating them."""

    def __init__(self, rng: random.Random, n_companies: int) -> None:
        self.rng = rng
        self._used: set[str] = set()
        self.passages: list[str] = []
        # (relation, subject name) -> (object name, id of the passage stating it)
        self.facts: dict[tuple[str, str], tuple[str, str]] = {}
        self.aliases: dict[str, list[str]] = {}  # name -> extra accepted answers
        self.stems: dict[str, str] = {}  # company/structure name -> its invented word
        self.rivers = [f"{self._stem()} River" for _ in range(max(3, n_companies // 8))]
        self.cities = [self._stem() for _ in range(max(6, n_companies // 3))]
        self.companies = [self._named(rng.choice(_COMPANY_SUFFIXES)) for _ in range(n_companies)]
        self.people = [f"{self._stem()} {self._stem()}" for _ in range(2 * n_companies)]
        kinds = list(_STRUCTURES)
        self.structures = [self._named(rng.choice(kinds)) for _ in range(n_companies * 3 // 2)]
        for name in self.companies:
            self.aliases[name] = [self.stems[name]]

    def _stem(self) -> str:
        """A fresh invented word such as "Varlo" or "Treishand"."""
        while True:
            n_syllables = self.rng.choice([2, 2, 2, 3])
            syllables = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n_syllables))
            word = (syllables + self.rng.choice(_CODAS)).capitalize()
            if len(word) >= 4 and word not in self._used:
                self._used.add(word)
                return word

    def _named(self, suffix: str) -> str:
        stem = self._stem()
        self.stems[f"{stem} {suffix}"] = stem
        return f"{stem} {suffix}"

    def _passage(self, title: str, text: str) -> str:
        self.passages.append(f'"{title}"\n{text}')
        return str(len(self.passages) - 1)

    def _fact(self, relation: str, subject: str, obj: str, passage_id: str) -> None:
        self.facts[(relation, subject)] = (obj, passage_id)

    def _other_city(self, *avoid: str) -> str:
        return self.rng.choice([c for c in self.cities if c not in avoid])

    def write_passages(self) -> None:
        """State every fact in short passages, plus distractors that reuse the invented names."""
        rng = self.rng
        founders, ceos = self.people[0::2], self.people[1::2]
        for company, founder, ceo in zip(self.companies, founders, ceos):
            hq = rng.choice(self.cities)
            pid = self._passage(company, f"{company} is a {rng.choice(_INDUSTRIES)} company headquartered in {hq}. "
                                         f"It employs about {rng.randrange(200, 20000):,} people.")
            self._fact("hq", company, hq, pid)
            pid = self._passage(company, f"{company} was founded by {founder} in {rng.randrange(1850, 1990)}. "
                                         f"Its first contract was for a warehouse in {self._other_city(hq)}.")
            self._fact("founder", company, founder, pid)
            pid = self._passage(company, f"Since {rng.randrange(1995, 2024)}, the chief executive of {company} has "
                                         f"been {ceo}. Under {ceo.split()[1]} the firm opened an office in "
                                         f"{self._other_city(hq)}.")
            self._fact("ceo", company, ceo, pid)
        for person in self.people:
            birth = rng.choice(self.cities)
            pid = self._passage(person, f"{person} was born in {birth} in {rng.randrange(1900, 1995)}. "
                                        f"{person.split()[0]} grew up near the {rng.choice(self.rivers)}.")
            self._fact("born", person, birth, pid)
            study, work = self._other_city(birth), self._other_city(birth)
            self._passage(person, f"{person} studied {rng.choice(_FIELDS)} at the University of {study} and "
                                  f"later worked as a {rng.choice(_JOBS)} in {work}.")
        builders = self.companies + [rng.choice(self.companies) for _ in self.structures[len(self.companies):]]
        for structure, builder in zip(self.structures, builders):
            site = rng.choice(self.cities)
            kind = structure.split()[-1]
            description = _STRUCTURES[kind].format(
                river=rng.choice(self.rivers), floors=rng.randrange(12, 60), seats=f"{rng.randrange(8, 60) * 1000:,}"
            )
            pid = self._passage(structure, f"The {structure} is a {description} in {site}.")
            self._fact("site", structure, site, pid)
            pid = self._passage(structure, f"The {structure} was built by {builder} and opened in "
                                           f"{rng.randrange(1880, 2020)}.")
            self._fact("builder", structure, builder, pid)
        for city in self.cities:
            self._passage(city, f"{city} is a city on the {rng.choice(self.rivers)} with about "
                                f"{rng.randrange(20, 900) * 1000:,} inhabitants. It is twinned with "
                                f"{self._other_city(city)}.")
        for _ in range(max(4, len(self.companies) // 2)):  # distractors sharing words with real names
            stem = self.stems[rng.choice(self.structures + self.companies)]
            namesake = f"{self._stem()} {rng.choice(self.people).split()[1]}"
            self._passage(f"{stem} Festival", f"The {stem} Festival is a music festival held in "
                                              f"{rng.choice(self.cities)} every {rng.choice(_MONTHS)}.")
            self._passage(namesake, f"{namesake} is a {rng.choice(_JOBS)} from {rng.choice(self.cities)} "
                                    f"who writes about bridges.")

    def questions(self) -> dict[str, list[dict[str, Any]]]:
        """Every answerable question, grouped by data_source, with its hop chain as metadata."""
        by_source: dict[str, list[dict[str, Any]]] = {}
        subjects = {"company": self.companies, "person": self.people, "structure": self.structures}
        for source, templates in _QUESTIONS.items():
            rows = by_source.setdefault(source, [])
            for template, chain in templates:
                for subject in subjects[_RELATIONS[chain[0]][0]]:
                    hops, entity = [], subject
                    for relation in chain:
                        answer, passage_id = self.facts[(relation, entity)]
                        hops.append({"query": _RELATIONS[relation][1].format(entity),
                                     "passage_id": passage_id, "answer": answer})
                        entity = answer
                    question = template.format(S=subject, C=subject, P=subject)
                    rows.append({"question": question, "golden_answers": [entity, *self.aliases.get(entity, [])],
                                 "data_source": source, "metadata": {"hops": hops}})
        return by_source


def generate_task(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_entities: int = 40,
    n_train: int = 500,
    n_test: int = 150,
) -> TaskFiles:
    """Write the generated task's ``corpus.jsonl``, ``train.jsonl`` and ``test.jsonl`` into ``out_dir``.

    ``n_entities`` is the number of companies; the world also has 2 people per company, 1.5
    structures per company and ``n_entities // 3`` cities (40 gives about 430 passages and 700
    distinct questions). The test split has equal shares of 1-, 2- and 3-hop questions; train
    draws from the remaining questions. Deterministic for a seed, and idempotent: files already
    written with the same parameters (recorded in ``task.json``) are kept.
    """
    out = Path(out_dir)
    files = TaskFiles(out / "corpus.jsonl", out / "train.jsonl", out / "test.jsonl")
    params = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_entities": n_entities,
              "n_train": n_train, "n_test": n_test}
    manifest = out / "task.json"
    if manifest.is_file() and all(p.is_file() for p in files):
        if json.loads(manifest.read_text()) == params:
            return files
    if n_entities < 3 or n_train < 0 or n_test < 0:
        raise ValueError(f"generate_task needs n_entities >= 3 and n_train, n_test >= 0; got {params}")

    rng = random.Random(seed)
    world = _World(rng, n_entities)
    world.write_passages()
    pools = world.questions()
    for rows in pools.values():
        rng.shuffle(rows)
    test, rest = _split_test(pools, n_test, params)
    rng.shuffle(rest)
    if n_train > len(rest):
        raise ValueError(f"generate_task: n_train={n_train} but only {len(rest)} questions remain after "
                         f"n_test={n_test} (n_entities={n_entities}); raise n_entities or lower n_train")
    train = rest[:n_train]

    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(files.corpus, [{"id": str(i), "contents": p} for i, p in enumerate(world.passages)])
    for path, rows, split in ((files.train, train, "train"), (files.test, test, "test")):
        _write_jsonl(path, [{"id": f"gen-{split}-{i}", **row} for i, row in enumerate(rows)])
    _write_text(manifest, json.dumps(params, indent=2) + "\n")
    return files


def _split_test(
    pools: dict[str, list[dict[str, Any]]], n_test: int, params: dict[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Take ``n_test`` questions spread evenly over the hop counts; return (test, the rest).

    The test questions are interleaved (1-, 2-, 3-hop, 1-, 2-, ...), so that the first n of the
    file (``data.eval_limit``) are as evenly spread over the hop counts as the whole.
    """
    shares, rest = [], []
    for i, rows in enumerate(pools.values()):
        share = n_test // len(pools) + (1 if i < n_test % len(pools) else 0)
        if share > len(rows):
            raise ValueError(f"generate_task: the test split needs {share} questions from a pool of "
                             f"{len(rows)}; raise n_entities or lower n_test ({params})")
        shares.append(rows[:share])
        rest += rows[share:]
    test = [rows[j] for j in range(max(map(len, shares), default=0)) for rows in shares if j < len(rows)]
    return test, rest


def _write_text(path: Path, text: str) -> None:
    """Write atomically, so that concurrent ranks never read a half-written file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------------
# A run's data: the files a config names, and the trainer's resumable prompt batches


def embedded_task(cfg: Any) -> TaskFiles:
    """The generated task of ``data.embedded_dir`` / ``data.embedded_seed`` (written once)."""
    return generate_task(cfg.data.embedded_dir, seed=cfg.data.embedded_seed)


def load_examples(cfg: Any, files: list[str], split: str, limit: int = 0) -> list[QAExample]:
    """Examples of ``files`` ("embedded" = the generated task's ``split``: train or test), at most
    ``limit`` per file (0 = all)."""
    out: list[QAExample] = []
    for f in files:
        path = getattr(embedded_task(cfg), split) if f == "embedded" else f
        rows = load_dataset(path)
        out += rows[:limit] if limit > 0 else rows
    if not out:
        raise ConfigError(f"no examples in {list(files)}; check data.train_files / data.eval_files / --data")
    return out


@dataclass
class PromptStream:
    """Deterministic prompt batches: epoch ``e`` is a seeded permutation; resumable from a position."""

    examples: list
    batch_size: int
    seed: int
    shuffle: bool = True
    position: int = 0
    """Prompts consumed so far (the data iterator's state in a checkpoint)."""

    def next_batch(self) -> list:
        batch = [self._at(self.position + i) for i in range(self.batch_size)]
        self.position += self.batch_size
        return batch

    def _at(self, index: int):
        epoch, offset = divmod(index, len(self.examples))
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return self.examples[order[offset]]
