"""Bad input: one test per kind of problem, under both on_bad_input policies; config safety."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from negprep.config import load_job, parse_job
from negprep.errors import ConfigError, InputError
from negprep.input.checks import REASONS, normalise
from negprep.input.files import fingerprints, input_files
from negprep.input.tables import load_table

CORPUS = [{"_id": f"d{i}", "title": f"T{i}", "text": f"passage {i}"} for i in range(4)]
QUERIES = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(3)]
QRELS = "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\n"


def _jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _write(d: Path, corpus=None, queries=None, qrels=None, names=("corpus.jsonl", "queries.jsonl", "qrels.tsv")):
    """Three input files in `d`; each argument is the file's text or bytes (default: a clean table)."""
    files = {}
    for role, content, default, name in zip(
        ("corpus", "queries", "qrels"),
        (corpus, queries, qrels),
        (_jsonl(CORPUS), _jsonl(QUERIES), QRELS),
        names,
        strict=True,
    ):
        content = default if content is None else content
        path = d / name
        if isinstance(content, pl.DataFrame):
            content.write_parquet(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        files[role] = str(path)
    return files


def _check(files: dict, policy: str, **job_keys) -> dict:
    job = parse_job({"input": files, "output": "/tmp/unused", "on_bad_input": policy, **job_keys})
    files = input_files(job)
    res = normalise(job, {r: load_table(u) for r, u in files.items()})
    for role, s in res["stats"].items():  # nothing disappears: every row read lands in exactly one place
        unused = sum(v for k, v in s.items() if k.startswith("rows_unused_"))
        assert s["rows_used"] + unused + s["rows_rejected"] == s["rows_read"], role
        assert sum(s["rejected"].values()) == s["rows_rejected"]
    assert set(res["rejected"]["reason"].to_list()) <= set(REASONS)
    return res


def _strict_error(files: dict, **job_keys) -> str:
    with pytest.raises(InputError) as e:
        _check(files, "strict", **job_keys)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _rejected(res: dict, role: str) -> list[dict]:
    return res["rejected"].filter(pl.col("input") == role).to_dicts()


def test_clean_input_has_no_problems(tmp_path):
    res = _check(_write(tmp_path), "strict")
    assert res["rejected"].height == 0
    assert res["stats"]["corpus"] == {
        "rows_read": 4,
        "rows_used": 4,
        "rows_rejected": 0,
        "rejected": {},
        "problems": [],
    }
    assert res["qrels"].height == 3


def test_missing_column_names_what_was_found_and_suggests_a_rename(tmp_path):
    files = _write(tmp_path, corpus=_jsonl([{"_id": "d0", "txt": "x"}]))
    for policy in ("strict", "lenient"):
        with pytest.raises(InputError, match=r"corpus.jsonl: no text column .*found _id, txt\); did you mean 'txt'"):
            _check(files, policy)


def test_headerless_tsv_gets_a_hint(tmp_path):
    files = _write(tmp_path, qrels="1\t0\t5\t1\n2\t0\t7\t1\n")
    with pytest.raises(InputError, match="header: is it missing"):
        _check(files, "lenient")


def test_wrong_json_type_is_rejected_per_line(tmp_path):
    corpus = [*CORPUS, {"_id": "d9", "text": {"nested": 1}}, {"_id": 7, "text": "a numeric id is fine"}]
    files = _write(tmp_path, corpus=_jsonl(corpus))
    assert _strict_error(files).startswith(f"{files['corpus']}: line 5: 'text' is an object, expected a string")
    res = _check(files, "lenient")
    (bad,) = _rejected(res, "corpus")
    assert (bad["line"], bad["reason"]) == (5, "wrong_type")
    assert "7" in res["corpus"]["id"].to_list()


def test_wrong_parquet_column_type_stops_the_job_in_both_policies(tmp_path):
    corpus = pl.DataFrame({"id": [1, 2], "text": [10, 20]})
    files = _write(tmp_path, corpus=corpus, names=("corpus.parquet", "queries.jsonl", "qrels.tsv"))
    for policy in ("strict", "lenient"):
        with pytest.raises(InputError, match=r"corpus.parquet: column 'text' has type integer, expected string"):
            _check(files, policy)


def test_parquet_integer_ids_are_read_as_strings_and_rows_are_numbered(tmp_path):
    corpus = pl.DataFrame({"id": [0, 1, 2, 1], "text": ["a", "b", "c", "dup"]})
    qrels = "query-id\tcorpus-id\tscore\nq0\t0\t1\n"
    files = _write(tmp_path, corpus=corpus, qrels=qrels, names=("corpus.parquet", "queries.jsonl", "qrels.tsv"))
    assert "corpus.parquet: row 4: duplicate id '1' (first on row 2)" in _strict_error(files)
    res = _check(files, "lenient")
    assert res["corpus"]["id"].to_list() == ["0", "1", "2"]


def test_duplicate_ids_keep_the_first_and_name_its_line(tmp_path):
    corpus = [*CORPUS, {"_id": "d1", "text": "again"}]
    files = _write(tmp_path, corpus=_jsonl(corpus), queries=_jsonl([*QUERIES, {"_id": "q0", "text": "dup"}]))
    msg = _strict_error(files)
    assert msg.startswith(f"{files['corpus']}: line 5: duplicate id 'd1' (first on line 2)")
    assert "2 problems in all" in msg and "on_bad_input: lenient" in msg
    res = _check(files, "lenient")
    assert res["stats"]["corpus"]["rejected"] == {"duplicate_id": 1}
    assert res["stats"]["queries"]["rejected"] == {"duplicate_id": 1}
    assert dict(res["corpus"].iter_rows())["d1"] == "T1 passage 1"


@pytest.mark.parametrize("text", ["", "   ", "\t\n ", None])
def test_empty_or_whitespace_text(tmp_path, text):
    row = {"_id": "d9", "text": text} if text is not None else {"_id": "d9"}
    files = _write(tmp_path, corpus=_jsonl([*CORPUS, row]))
    assert _strict_error(files).startswith(f"{files['corpus']}: line 5: empty text (id 'd9')")
    res = _check(files, "lenient")
    assert [r["reason"] for r in _rejected(res, "corpus")] == ["empty_text"]
    assert json.loads(_rejected(res, "corpus")[0]["row"])["_id"] == "d9"


def test_missing_id(tmp_path):
    files = _write(tmp_path, corpus=_jsonl([*CORPUS, {"_id": " ", "text": "no id"}, {"text": "none at all"}]))
    res = _check(files, "lenient")
    assert [(r["line"], r["reason"]) for r in _rejected(res, "corpus")] == [(5, "missing_id"), (6, "missing_id")]


def test_qrels_naming_unknown_or_rejected_ids(tmp_path):
    corpus = [*CORPUS, {"_id": "d8", "text": " "}]
    qrels = QRELS + "q0\td404\t1\nq404\td0\t1\nq1\td8\t1\n"
    files = _write(tmp_path, corpus=_jsonl(corpus), qrels=qrels)
    res = _check(files, "lenient")
    got = {r["line"]: (r["reason"], r["detail"]) for r in _rejected(res, "qrels")}
    assert got == {
        5: ("unknown_doc_id", "unknown passage id 'd404' (not in corpus.jsonl)"),
        6: ("unknown_query_id", "unknown query id 'q404' (not in queries.jsonl)"),
        7: ("rejected_doc_id", "passage 'd8' is a rejected row of corpus.jsonl (line 5: empty_text)"),
    }
    assert res["qrels"].height == 3


def test_queries_without_positive_are_counted_not_rejected(tmp_path):
    qrels = "query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t0\n"
    res = _check(_write(tmp_path, qrels=qrels), "strict")
    assert res["stats"]["queries"]["rows_unused_no_positive"] == 2
    assert res["stats"]["qrels"]["rows_unused_not_positive"] == 1
    assert res["queries"]["id"].to_list() == ["q0"]


def test_no_positive_at_all_stops_in_both_policies(tmp_path):
    files = _write(tmp_path, qrels="query-id\tcorpus-id\tscore\nq0\td0\t0\nq1\td0\t-1\n")
    for policy in ("strict", "lenient"):
        with pytest.raises(InputError, match="no usable"):
            _check(files, policy)


def test_malformed_json_line(tmp_path):
    corpus = _jsonl(CORPUS[:2]) + '{"_id": "d7", "text": "unterminated}\n' + "[1, 2]\n" + _jsonl(CORPUS[2:])
    files = _write(tmp_path, corpus=corpus)
    msg = _strict_error(files)
    assert msg.startswith(f"{files['corpus']}: line 3: malformed JSON: Unterminated string")
    res = _check(files, "lenient")
    rej = _rejected(res, "corpus")
    assert [(r["line"], r["reason"]) for r in rej] == [(3, "malformed_json"), (4, "malformed_json")]
    assert rej[1]["detail"] == "expected a JSON object, got an array" and rej[1]["row"] == "[1, 2]"
    assert res["corpus"].height == 4 and res["stats"]["corpus"]["rows_read"] == 6


def test_bytes_that_are_not_utf8(tmp_path):
    corpus = _jsonl(CORPUS).encode() + b'{"_id": "d8", "text": "caf\xe9"}\n'
    qrels = QRELS.encode() + b"q1\td\xff\t1\n"
    files = _write(tmp_path, corpus=corpus, qrels=qrels)
    assert _strict_error(files).startswith(f"{files['corpus']}: line 5: bytes that are not UTF-8")
    res = _check(files, "lenient")
    assert [(r["line"], r["reason"]) for r in _rejected(res, "corpus")] == [(5, "not_utf8")]
    assert [(r["line"], r["reason"]) for r in _rejected(res, "qrels")] == [(5, "not_utf8")]
    assert "caf\ufffd" in _rejected(res, "corpus")[0]["row"]


def test_lone_surrogate_escape_in_json(tmp_path):
    files = _write(tmp_path, corpus=_jsonl([*CORPUS, '{"_id": "d8", "text": "a \\udc80 b"}']))
    res = _check(files, "lenient")
    assert [(r["line"], r["reason"]) for r in _rejected(res, "corpus")] == [(5, "not_utf8")]


def test_csv_quoting_errors(tmp_path):
    corpus = 'id,text\nd0,"fine, quoted"\nd1,"stray"quote\nd2,"says ""hi"""\nd3,plain\nd4,a,b\n'
    files = _write(tmp_path, corpus=corpus, names=("corpus.csv", "queries.jsonl", "qrels.tsv"))
    assert _strict_error(files).startswith(f"{files['corpus']}: line 3: CSV quoting error: ',' expected after '\"'")
    res = _check(files, "lenient")
    rej = _rejected(res, "corpus")
    assert [(r["line"], r["reason"]) for r in rej] == [(3, "csv_error"), (6, "csv_error")]
    assert rej[1]["detail"].startswith("3 fields where the header has 2")
    assert dict(res["corpus"].iter_rows()) == {"d0": "fine, quoted", "d2": 'says "hi"', "d3": "plain"}


def test_csv_unterminated_quote_names_the_lines_it_swallowed(tmp_path):
    corpus = 'id,text\nd0,a\nd1,"never closed\nd2,b\nd3,c\n'
    files = _write(tmp_path, corpus=corpus, names=("corpus.csv", "queries.jsonl", "qrels.tsv"))
    assert "line 3: CSV quoting error: unexpected end of data (the record runs over lines 3-5)" in _strict_error(files)


def test_extremely_long_text(tmp_path):
    corpus = [*CORPUS, {"_id": "d9", "text": "x" * 5000}]
    files = _write(tmp_path, corpus=_jsonl(corpus))
    msg = _strict_error(files, read={"max_text_chars": 1000})
    assert msg.startswith(f"{files['corpus']}: line 5: text of 5000 characters is longer than read.max_text_chars")
    res = _check(files, "lenient", read={"max_text_chars": 1000})
    assert res["stats"]["corpus"]["rejected"] == {"text_too_long": 1}
    assert _check(files, "strict", read={"max_text_chars": None})["corpus"].height == 5


def test_score_not_a_number_and_duplicate_judgment(tmp_path):
    files = _write(tmp_path, qrels=QRELS + "q0\td3\tvery\nq0\td0\t2\nq1\td3\tnan\n")
    res = _check(files, "lenient")
    got = [(r["line"], r["reason"]) for r in _rejected(res, "qrels")]
    assert got == [(5, "score_not_a_number"), (6, "duplicate_judgment"), (7, "score_not_a_number")]
    assert _rejected(res, "qrels")[1]["detail"] == "duplicate judgment of 'q0', 'd0' (first on line 2)"


def test_unreadable_files_are_one_line_errors(tmp_path):
    files = _write(tmp_path, names=("corpus.parquet", "queries.jsonl", "qrels.tsv"))  # JSONL text in a .parquet
    with pytest.raises(InputError, match="corpus.parquet: not a readable Parquet file"):
        _check(files, "lenient")
    files = _write(tmp_path, corpus="")
    with pytest.raises(InputError, match="corpus.jsonl: no rows$"):
        _check(files, "lenient")
    files = _write(tmp_path, corpus="not json\n{also not\n")
    with pytest.raises(InputError, match="line 1: malformed JSON.*no row of the file is readable"):
        _check(files, "lenient")


def test_path_errors_before_anything_is_read(tmp_path):
    files = _write(tmp_path)
    with pytest.raises(InputError, match="unknown table format"):
        fingerprints({**files, "corpus": str(tmp_path / "corpus.xlsx")})
    with pytest.raises(InputError, match="corpus file not found"):
        fingerprints({**files, "corpus": str(tmp_path / "nope.jsonl")})
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(InputError, match="corpus is a directory"):
        fingerprints({**files, "corpus": str(tmp_path / "dir.jsonl")})


def test_pairs_input_problems(tmp_path):
    pairs = [
        {"anchor": "q a", "positive": "p a"},
        {"anchor": "q a", "positive": "p a"},
        {"anchor": " ", "positive": "p b"},
        {"anchor": "q c", "positive": ["not", "text"]},
        {"anchor": "q d", "positive": "p d"},
    ]
    (tmp_path / "pairs.jsonl").write_text(_jsonl(pairs))
    inp = {"pairs": str(tmp_path / "pairs.jsonl"), "query_column": "anchor"}
    res = _check(inp, "lenient")
    got = [(r["line"], r["reason"]) for r in _rejected(res, "pairs")]
    assert got == [(2, "duplicate_pair"), (3, "empty_text"), (4, "wrong_type")]
    assert res["stats"]["pairs"]["rows_used"] == 2 and res["qrels"].height == 2
    with pytest.raises(InputError, match="pairs.jsonl: line 2: duplicate pair 'q a', 'p a' \\(first on line 1\\)"):
        _check(inp, "strict")


def test_problem_details_with_markup_are_kept_verbatim(tmp_path):
    files = _write(tmp_path, corpus=_jsonl([*CORPUS, {"_id": "<b>{}</b>", "text": ""}]))
    res = _check(files, "lenient")
    assert _rejected(res, "corpus")[0]["detail"] == "empty text (id '<b>{}</b>')"


# ---------------------------------------------------------------------------------------------
# Command line: one line, exit code 2, before Ray where possible


def _cli(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "negprep", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_validate_lists_problems_and_fails_only_when_strict(tmp_path):
    files = _write(tmp_path, corpus=_jsonl([*CORPUS, "{broken"]))
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"input": files, "output": str(tmp_path / "out")}))
    r = _cli("validate", str(job))
    assert r.returncode == 0, r.stderr
    assert "line 5: malformed JSON" in r.stdout and "1 input row rejected" in r.stdout
    job.write_text(json.dumps({"input": files, "output": str(tmp_path / "out"), "on_bad_input": "strict"}))
    assert "corpus.jsonl: line 5: malformed JSON" in _one_line(_cli("validate", str(job)))


def test_strict_run_stops_in_the_ray_task_with_one_line(tmp_path, tiny_bert):
    """The read stage runs in a Ray task: its InputError must still reach the CLI as one line, exit 2."""
    files = _write(tmp_path, queries=_jsonl([*QUERIES, {"_id": "q0", "text": "again"}]))
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "input": files,
                "output": str(tmp_path / "out"),
                "model": str(tiny_bert),
                "on_bad_input": "strict",
                "ray": {"num_cpus": 1, "object_store_mb": 256},
            }
        )
    )
    r = _cli("run", "--quiet", str(job), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    # Ray may log its own start-up lines; negprep's error is one line, the last
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("negprep:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
    line = errors[0]
    assert line.startswith(f"negprep: error: {files['queries']}: line 4: duplicate id 'q0' (first on line 1)")
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_yaml_tags_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: x\noutput: y\nseed: !!python/object/apply:os.system ['touch {marker}']\n")
    line = _one_line(_cli("validate", str(job)))
    assert "not valid YAML" in line and "line 3" in line
    assert not marker.exists()
    job.write_text("input: !!python/name:os.system\noutput: y\n")
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        load_job(str(job))


def test_config_errors_are_one_line(tmp_path, demo_data):
    job = tmp_path / "job.yaml"
    job.write_text("input: x\noutput: y\non_bad_input: maybe\n")
    assert "on_bad_input" in _one_line(_cli("validate", str(job)))
    job.write_text("input: x\noutput: y\nread: {max_text_chars: -3}\n")
    assert "read.max_text_chars" in _one_line(_cli("validate", str(job)))
    assert "job file not found" in _one_line(_cli("validate", str(tmp_path / "missing.yaml")))
    job.write_text(f"input: {demo_data}\noutput: y\nmodel: no-such-model-anywhere\n")  # offline (conftest): not cached
    assert "model 'no-such-model-anywhere'" in _one_line(_cli("validate", str(job)))
    with pytest.raises(ConfigError, match="must not contain one another"):
        parse_job({"input": "x", "output": "out", "work_dir": "out/work"})
    with pytest.raises(ConfigError, match="guide: .*dtype int8 applies to a bi-encoder guide"):
        parse_job({"input": "x", "output": "y", "guide": {"model": "m", "type": "crossencoder", "dtype": "int8"}})
    assert parse_job({"input": "x", "output": "y", "embed": {"dtype": "int8"}}).embed.dtype == "int8"
    with pytest.raises(ConfigError, match="embed: .*runtime onnxruntime runs float32 or int8, not bfloat16"):
        parse_job({"input": "x", "output": "y", "embed": {"runtime": "onnxruntime", "dtype": "bfloat16"}})
    with pytest.raises(ConfigError, match="compile applies to runtime torch"):
        parse_job({"input": "x", "output": "y", "embed": {"runtime": "onnxruntime", "compile": True}})


def test_trust_remote_code_is_off_unless_the_job_asks(tmp_path, tiny_bert):
    """A model folder that ships its own Python code: loading it must not run that code."""
    import shutil

    from negprep.models.encoders import Encoder, encoder_specs

    marker = tmp_path / "ran"
    model = tmp_path / "custom-model"
    shutil.copytree(tiny_bert, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg |= {"model_type": "negprep-custom", "auto_map": {"AutoConfig": "custom.Config", "AutoModel": "custom.Model"}}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    job = parse_job({"input": "x", "output": "y", "model": str(model)})
    assert job.embed.trust_remote_code is False
    pspec, qspec = encoder_specs(str(model), job.embed)
    assert not pspec.trust_remote_code and not qspec.trust_remote_code
    with pytest.raises(ValueError, match="trust_remote_code"):
        Encoder(pspec)
    assert not marker.exists()


def test_job_file_problems_are_one_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: x\noutput: y\nnum_negatives: 3\nembed: {batch_size: 8}\nnum_negatives: 30\n")
    with pytest.raises(ConfigError, match=r"job.yaml: line 5 not valid YAML: duplicate key 'num_negatives'"):
        load_job(str(job))
    job.write_bytes(b"input: x\noutput: \xff\n")
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job(str(job))
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job(str(tmp_path))
    job.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_job(str(job))
