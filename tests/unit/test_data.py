from pathlib import Path

import pytest

from megatron_fipo.data.arithmetic import arithmetic_problems, split_eval
from megatron_fipo.data.math_datasets import DAPO_INSTRUCTION, DatasetError, load_problems
from megatron_fipo.data.problems import ProblemStream
from megatron_fipo.data.tokenizer import SentencePieceTokenizer

DATA = Path(__file__).resolve().parents[1] / "data"


def test_dapo_rows_are_validated_and_bad_rows_reported_with_file_and_line():
    problems, report = load_problems(DATA / "dapo_math_sample.jsonl", "dapo_math", "skip")
    assert [p.answer for p in problems] == ["2", "\\frac{1}{2}", "1024"]
    assert problems[0].messages[0]["role"] == "user" and "Answer:" in problems[0].messages[0]["content"]
    assert len(report.skipped) == 3
    assert "dapo_math_sample.jsonl:3: malformed dapo_math row: missing key 'reward_model'" in report.skipped[0]
    assert "dapo_math_sample.jsonl:4:" in report.skipped[1] and "not valid JSON" in report.skipped[1]
    assert "dapo_math_sample.jsonl:5:" in report.skipped[2] and "'prompt'" in report.skipped[2]


def test_bad_row_is_fatal_when_configured():
    with pytest.raises(DatasetError, match=r"dapo_math_sample.jsonl:3: .*set data.on_bad_row=skip"):
        load_problems(DATA / "dapo_math_sample.jsonl", "dapo_math", "fail")


def test_parquet_with_the_hf_dataset_columns(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "dapo_math_sample.jsonl").read_text().splitlines()
            if line.startswith("{") and "reward_model" in line and '"prompt": []' not in line]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    problems, report = load_problems(tmp_path / "dapo.parquet", "dapo_math")
    assert [p.answer for p in problems] == ["2", "\\frac{1}{2}", "1024"] and not report.skipped


def test_aime_rows_get_the_dapo_instruction():
    problems, report = load_problems(DATA / "aime_sample.jsonl", "aime")
    assert [p.answer for p in problems] == ["9", "4"]
    assert problems[1].messages[0]["content"] == DAPO_INSTRUCTION.format(problem="Compute $\\sqrt{8}\\cdot\\sqrt{2}$.")
    assert "aime_sample.jsonl:3" in report.skipped[0]


def test_missing_file_names_the_path():
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_problems(DATA / "nope.jsonl", "aime")


def test_arithmetic_split_and_stream_resume():
    problems = arithmetic_problems(10)
    assert len(problems) == 100 and problems[23].messages[0]["content"] == "2+3=" and problems[23].answer == "5"
    train, evals = split_eval(problems, 20, seed=1)
    assert len(train) == 80 and len(evals) == 20 and not set(map(id, train)) & set(map(id, evals))
    a = ProblemStream(train, seed=3)
    first = a.take(130)  # crosses an epoch boundary
    b = ProblemStream(train, seed=3, position=50)
    assert b.take(80) == first[50:]
    assert sorted(p.answer + p.messages[0]["content"] for p in first[:80]) == sorted(
        p.answer + p.messages[0]["content"] for p in train)


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    corpus = [p.messages[0]["content"] + p.answer for p in arithmetic_problems(10)]
    tok = SentencePieceTokenizer.train(corpus, vocab_size=16)
    assert tok.vocab_size <= 16
    ids = tok.encode("7+8=15")
    assert tok.decode(ids) == "7+8=15"
    # Ids past the tokenizer (the model pads its vocabulary) and EOS decode to nothing.
    assert tok.decode(ids + [tok.eos_id, 60, 63]) == "7+8=15"
