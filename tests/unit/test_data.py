"""FlashRAG/verl dataset loading and the generated knowledge-base task."""

import json

import pytest

from atpo_megatron.env.data import DatasetError, QAExample, generate_task, load_dataset
from atpo_megatron.env.retriever import BM25Backend, load_corpus


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_flashrag_jsonl(tmp_path):
    path = _write_lines(tmp_path / "nq.jsonl", [
        json.dumps({"id": "q1", "question": " who? ", "golden_answers": ["A", "B"], "data_source": "nq"}),
        "",
        json.dumps({"question": "what", "golden_answers": "C"}),
    ])
    assert load_dataset(path) == [
        QAExample(id="q1", question="who?", golden_answers=["A", "B"], data_source="nq"),
        QAExample(id="nq-3", question="what", golden_answers=["C"], data_source="nq"),  # defaults
    ]
    assert load_dataset(path, data_source="other")[1].data_source == "other"


def test_load_verl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {  # the paper's verl rows: the question sits after "\nuser\n" in the system message
            "data_source": "hotpotqa",
            "prompt": [{"role": "system", "content": "You are helpful...\nuser\nWho built it?"}],
            "reward_model": {"style": "rule", "ground_truth": {"target": ["Orvane"]}},
            "extra_info": {"index": 0},
        },
        {
            "data_source": "hotpotqa",
            "prompt": [{"role": "system", "content": "prefix \\nuser\\nWhere is it?"}],  # literal backslash-n
            "reward_model": {"style": "rule", "ground_truth": {"target": ["Tesh", "Teshy"]}},
            "extra_info": {"index": 1},
        },
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_dataset(path) == [
        QAExample(id="train-0", question="Who built it?", golden_answers=["Orvane"], data_source="hotpotqa"),
        QAExample(id="train-1", question="Where is it?", golden_answers=["Tesh", "Teshy"], data_source="hotpotqa"),
    ]


def test_load_flashrag_parquet_with_question_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "dev.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "7", "question": "q?", "golden_answers": ["a"]}]), path)
    assert load_dataset(path) == [QAExample(id="7", question="q?", golden_answers=["a"], data_source="dev")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "JSON object"),
        ('{"golden_answers": ["a"]}', "no question"),
        ('{"question": "q"}', "golden answers"),
        ('{"question": "q", "golden_answers": []}', "golden answers"),
        ('{"question": "q", "golden_answers": [{"x": 1}]}', "golden answers"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "q", "golden_answers": ["a"]})
    path = _write_lines(tmp_path / "d.jsonl", [good, bad_line])
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(path)
    assert f"{path}:2" in str(info.value)


def test_malformed_parquet_names_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = [{"question": "q", "golden_answers": ["a"]}, {"question": "q", "golden_answers": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DatasetError, match=f"{path} row 1"):
        load_dataset(path)


def test_missing_empty_or_unknown_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(_write_lines(tmp_path / "empty.jsonl", []))
    with pytest.raises(DatasetError, match="unknown format"):
        load_dataset(_write_lines(tmp_path / "d.csv", ["a,b"]))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return generate_task(tmp_path_factory.mktemp("task"), seed=0)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generated_task_sizes_and_sources(task):
    corpus, train, test = _rows(task.corpus), _rows(task.train), _rows(task.test)
    assert 300 <= len(corpus) <= 600
    assert len(train) == 500 and len(test) == 150
    assert [r["data_source"] for r in test].count("gen-3hop") == 50  # even test split over hop counts
    assert [r["data_source"][4] for r in test[:6]] == list("123123")  # interleaved: any prefix is even too
    assert {r["data_source"] for r in train} == {"gen-1hop", "gen-2hop", "gen-3hop"}
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for row in train + test:
        hops = row["metadata"]["hops"]
        assert len(hops) == int(row["data_source"][4])
        assert hops[-1]["answer"] == row["golden_answers"][0]
    examples = load_dataset(task.test)  # loadable by our own loader
    assert examples[0].id == "gen-test-0" and examples[0].golden_answers == test[0]["golden_answers"]


def test_generated_task_is_deterministic_and_idempotent(task, tmp_path):
    again = generate_task(tmp_path / "a", seed=0)
    for mine, theirs in zip(task, again):
        assert mine.read_bytes() == theirs.read_bytes()
    mtime = again.corpus.stat().st_mtime_ns
    assert generate_task(tmp_path / "a", seed=0) == again
    assert again.corpus.stat().st_mtime_ns == mtime  # same parameters: nothing rewritten
    other = generate_task(tmp_path / "a", seed=1)  # new parameters: rewritten
    assert other.corpus.read_bytes() != task.corpus.read_bytes()


def test_hop_chains_link_up(task):
    for row in _rows(task.test):
        hops = row["metadata"]["hops"]
        for previous, hop in zip(hops, hops[1:]):  # each answer is the next hop's subject
            assert hop["query"].startswith(previous["answer"] + " ")
        assert hops[0]["query"].split()[0] in row["question"]  # the chain starts from the question


def test_every_hop_is_retrievable_with_bm25_top3(task):
    corpus = load_corpus(task.corpus)
    bm25 = BM25Backend(corpus)
    rows = _rows(task.train) + _rows(task.test)
    hops = [hop for row in rows for hop in row["metadata"]["hops"]]
    results = bm25.search([hop["query"] for hop in hops], topk=3)
    found = [hop["passage_id"] in {corpus.ids[i] for i, _ in hits} for hop, hits in zip(hops, results)]
    assert sum(found) / len(found) >= 0.95
    first_hops = [row["metadata"]["hops"][0] for row in rows if len(row["metadata"]["hops"]) > 1]
    first_hits = bm25.search([hop["query"] for hop in first_hops], topk=3)
    first_found = [hop["passage_id"] in {corpus.ids[i] for i, _ in hits} for hop, hits in zip(first_hops, first_hits)]
    assert sum(first_found) / len(first_found) >= 0.95
    for hop in hops[:50]:  # the needed passage states the fact: it names the answer
        assert hop["answer"] in corpus.contents[int(hop["passage_id"])]


def test_too_many_questions_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="raise n_entities"):
        generate_task(tmp_path, seed=0, n_entities=6, n_train=10_000)
