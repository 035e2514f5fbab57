"""Property-based tests (hypothesis): the input readers and the mining rules on generated data."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from negprep.config import parse_job
from negprep.errors import InputError
from negprep.input.checks import REASONS as INPUT_REASONS
from negprep.input.checks import normalise
from negprep.input.tables import LINE, parse_table
from negprep.rules import mining
from negprep.rules.candidates import mine_candidates
from negprep.rules.mining import KEEP, OUTSIDE, REASONS, Rules, choose, classify, margin_thresholds, reason_counts

from .conftest import rows_for_output

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# texts: any characters except lone surrogates (not encodable, so no file can hold them)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
ID = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(lambda s: s.strip())


# ---------------------------------------------------------------------------------------------
# Readers


def _encode(rows: list[dict], fmt: str, alt: bool = False) -> bytes:
    """`rows` as a file; `alt` picks the other writer (ASCII-escaped JSON; polars instead of csv)."""
    cols = list(rows[0])
    frame = pl.DataFrame(rows, schema={c: pl.String for c in cols})
    sep = "\t" if fmt == "tsv" else ","
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=alt) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    if fmt == "parquet":
        frame.write_parquet(buf)
        return buf.getvalue()
    if alt:
        frame.write_csv(buf, separator=sep)
        return buf.getvalue()
    out = io.StringIO(newline="")
    w = csv.writer(out, delimiter=sep)  # the default \r\n line end makes it quote fields holding \r or \n
    w.writerow(cols)
    w.writerows([[r[c] for c in cols] for r in rows])
    return out.getvalue().encode()


@st.composite
def tables(draw):
    ids = draw(st.lists(ID, min_size=1, max_size=12, unique=True))
    return [{"id": i, "title": draw(TEXT), "text": draw(TEXT)} for i in ids]


@SETTINGS
@given(rows=tables(), fmt=st.sampled_from(["jsonl", "csv", "tsv", "parquet"]), alt=st.booleans())
def test_tables_read_back_identically(rows, fmt, alt):
    t = parse_table(_encode(rows, fmt, alt), fmt, f"t.{fmt}")
    assert not t.problems
    assert t.columns == ["id", "title", "text"]
    assert t.frame.drop(LINE).to_dicts() == rows
    assert t.rows_read == len(rows)


def _job(policy: str = "lenient", **kw):
    files = {"corpus": "c.jsonl", "queries": "q.jsonl", "qrels": "r.tsv"}
    return parse_job({"input": files, "output": "/tmp/unused", "on_bad_input": policy, **kw})


_QUERIES = b'{"_id": "q1", "text": "a question"}\n'


def _normalise(corpus: bytes, fmt: str, policy: str = "lenient", qrels: bytes | None = None, **kw):
    tables = {
        "corpus": parse_table(corpus, fmt, f"corpus.{fmt}"),
        "queries": parse_table(_QUERIES, "jsonl", "queries.jsonl"),
        "qrels": parse_table(qrels or b"query-id\tcorpus-id\tscore\nq1\td1\t1\n", "tsv", "qrels.tsv"),
    }
    return normalise(_job(policy, **kw), tables)


def _accounted(res: dict) -> None:
    for role, s in res["stats"].items():
        unused = sum(v for k, v in s.items() if k.startswith("rows_unused_"))
        assert s["rows_used"] + unused + s["rows_rejected"] == s["rows_read"], role
    assert set(res["rejected"]["reason"].to_list()) <= set(INPUT_REASONS)


@SETTINGS
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["jsonl", "csv", "tsv", "parquet"]))
def test_garbage_gives_input_errors_or_rejects_never_a_crash(data, fmt):
    try:
        res = _normalise(data, fmt)
    except InputError as e:
        assert "\n" not in str(e)
        return
    _accounted(res)


VALID = b'{"_id": "d1", "text": "first passage"}\n{"_id": "d2", "title": "T", "text": "second"}\n'


@SETTINGS
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(VALID)), st.binary(min_size=0, max_size=3), st.integers(0, 3)), max_size=6
    )
)
def test_damaged_jsonl_is_rejected_line_by_line(edits):
    data = bytearray(VALID)
    for pos, ins, cut in edits:
        pos = min(pos, len(data))
        data[pos : pos + cut] = ins
    try:
        res = _normalise(bytes(data), "jsonl")
    except InputError as e:
        assert "\n" not in str(e)
        return
    _accounted(res)
    lines = [ln for ln in bytes(data).split(b"\n") if ln.strip()]
    assert res["stats"]["corpus"]["rows_read"] == len(lines)


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


@SETTINGS
@given(
    rows=st.lists(
        st.fixed_dictionaries({"_id": st.one_of(ID, JSON_VALUE), "text": st.one_of(TEXT, JSON_VALUE)}),
        min_size=1,
        max_size=10,
    ),
    limit=st.sampled_from([None, 12, 30]),
)
@example(rows=[{"_id": "0", "text": "\x1f"}], limit=None)  # a separator alone: blank to Python, not to polars
def test_every_kept_passage_satisfies_the_contract(rows, limit):
    rows = [{"_id": "d1", "text": "p"}, *rows]  # short: the positive survives every limit
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    res = _normalise(data, "jsonl", read={"max_text_chars": limit or None})
    _accounted(res)
    corpus = res["corpus"]
    assert corpus["id"].n_unique() == corpus.height
    for pid, text in corpus.iter_rows():
        assert pid.strip() and text.strip()
        assert limit is None or len(text) <= limit
    # strict stops exactly when lenient rejects something
    if res["rejected"].height:
        with pytest.raises(InputError):
            _normalise(data, "jsonl", "strict", read={"max_text_chars": limit or None})
    else:
        _normalise(data, "jsonl", "strict", read={"max_text_chars": limit or None})


@SETTINGS
@given(
    qrels=st.lists(
        st.tuples(
            st.sampled_from(["q1", "q2", ""]),
            st.sampled_from(["d1", "d2", "d9", ""]),
            st.sampled_from(["1", "0", "x", "2.5", "-1"]),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_qrels_rows_land_in_exactly_one_place(qrels):
    text = "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    try:
        res = _normalise(VALID, "jsonl", qrels=text.encode())
    except InputError as e:
        assert "no usable" in str(e)
        return
    _accounted(res)
    pos = res["qrels"]
    assert pos["query_id"].is_in(["q1"]).all() and pos["doc_id"].is_in(["d1", "d2"]).all()
    assert (pos["score"] > 0).all()
    assert pos.select(pl.struct("query_id", "doc_id").n_unique()).item() == pos.height


# ---------------------------------------------------------------------------------------------
# Mining rules

SCORE = st.floats(-1, 1, allow_nan=False, width=32)


@st.composite
def score_rows(draw):
    n = draw(st.integers(1, 6))
    k = draw(st.integers(1, 12))
    rows = []
    for _ in range(n):
        m = draw(st.integers(0, k))
        rows.append(sorted(draw(st.lists(SCORE, min_size=m, max_size=m)), reverse=True))
    ref = draw(st.lists(st.one_of(SCORE, st.just(float("nan"))), min_size=n, max_size=n))
    return mining.pad_rows([np.asarray(r, dtype=np.float64) for r in rows], k), np.asarray(ref, dtype=np.float64)


@st.composite
def rules(draw, k: int = 12):
    lo = draw(st.integers(0, k - 1))
    return Rules(
        num_negatives=draw(st.integers(1, 6)),
        range_min=lo,
        range_max=draw(st.integers(lo + 1, k + 2)),
        relative_margin=draw(st.none() | st.floats(0, 0.99)),
        absolute_margin=draw(st.none() | st.floats(0, 1)),
        max_score=draw(st.none() | SCORE),
        min_score=draw(st.none() | SCORE),
        sampling=draw(st.sampled_from(["top", "random"])),
        seed=draw(st.integers(0, 2**31)),
    )


@SETTINGS
@given(sr=score_rows(), rules=rules())
def test_classify_counts_add_up_and_kept_candidates_satisfy_every_rule(sr, rules):
    scores, ref = sr
    code = classify(scores, ref, rules)
    k = scores.shape[1]
    window = (np.arange(k) >= rules.range_min) & (np.arange(k) < rules.range_max)
    live = window[None, :] & ~np.isnan(scores)
    assert ((code != OUTSIDE) == live).all()
    c = reason_counts(code)
    assert c["candidates"] == live.sum()
    assert c["kept"] + sum(c[f"dropped_{r}"] for r in REASONS) == c["candidates"]
    kept = code == KEEP
    s = np.where(kept, scores, np.nan)
    rows, cols = np.nonzero(kept)
    if rules.max_score is not None:
        assert (s[kept] <= rules.max_score).all()
    if rules.min_score is not None:
        assert (s[kept] >= rules.min_score).all()
    for rel, ab in ((rules.relative_margin, None), (None, rules.absolute_margin)):
        if rel is not None or ab is not None:
            thr = margin_thresholds(ref, rel, ab)
            assert (scores[rows, cols] <= thr[rows]).all()  # NaN reference: nothing kept
    # a dropped candidate is charged to the first rule that rejects it
    for i, name in enumerate(REASONS):
        hit = code == i + 1
        if hit.any() and name in ("max_score", "min_score"):
            bound = rules.max_score if name == "max_score" else rules.min_score
            assert ((scores[hit] > bound) if name == "max_score" else (scores[hit] < bound)).all()


@SETTINGS
@given(
    keep=st.integers(1, 8).flatmap(
        lambda k: st.lists(st.lists(st.booleans(), min_size=k, max_size=k), min_size=1, max_size=5)
    ),
    n=st.integers(1, 10),
    sampling=st.sampled_from(["top", "random"]),
    seed=st.integers(0, 1000),
)
def test_choose_takes_only_kept_candidates_nearest_first(keep, n, sampling, seed):
    keep = np.asarray(keep, dtype=bool)
    seeds = np.array([mining.row_seed(seed, "q", str(i)) for i in range(len(keep))], dtype=np.uint64)
    picked = choose(keep, n, sampling, seeds)
    assert picked.shape == (len(keep), n)
    for r, row in enumerate(picked):
        got = row[row >= 0]
        assert len(got) == min(n, keep[r].sum())
        assert keep[r][got].all()
        assert (np.diff(got) > 0).all() and (row[len(got) :] == -1).all()
        if sampling == "top":
            assert got.tolist() == np.flatnonzero(keep[r])[:n].tolist()
    again = choose(keep, n, sampling, seeds)
    assert (again == picked).all()


@st.composite
def candidate_tables(draw):
    nq = draw(st.integers(1, 5))
    rows = []
    for q in range(nq):
        npos = draw(st.integers(1, 3))
        m = draw(st.integers(0, 10))
        pos = [f"p{q}_{j}" for j in range(npos)]
        # search removes labelled positives; slip some in anyway: the duplicate rule must still catch them
        pool = [f"d{x}" for x in range(31)] + pos
        cands = draw(st.lists(st.sampled_from(pool), min_size=m, max_size=m, unique=True))
        rows.append(
            {
                "query_id": f"q{q}",
                "candidate_ids": cands,
                "candidate_scores": sorted(draw(st.lists(SCORE, min_size=m, max_size=m)), reverse=True),
                "positive_ids": pos,
                "positive_scores": draw(st.lists(SCORE, min_size=npos, max_size=npos)),
            }
        )
    return pa.Table.from_pylist(rows)


@SETTINGS
@given(cand=candidate_tables(), rules=rules(k=10), dup=st.sets(st.integers(0, 30), max_size=5))
def test_mined_rows_respect_rules_and_never_use_a_positive(cand, rules, dup):
    # some candidates share a positive's text: the duplicate rule must drop them
    pos_ids = {p for ps in cand.column("positive_ids").to_pylist() for p in ps}
    keys = {p: 1000 + i for i, p in enumerate(sorted(pos_ids))}
    first_pos = sorted(pos_ids)[0]
    keys |= {f"d{x}": (keys[first_pos] if x in dup else x) for x in range(31)}  # some share a positive's text
    mined, counts = mine_candidates(cand, rules, text_keys=keys)
    assert counts["kept"] + sum(counts[f"dropped_{r}"] for r in REASONS) == counts["candidates"]
    cols = rows_for_output(mined, "triplet", rules.num_negatives)
    assert len(cols["negative_id"]) == counts["negatives"] <= counts["pairs"] * rules.num_negatives
    positives = dict(zip(cand.column("query_id").to_pylist(), cand.column("positive_ids").to_pylist(), strict=True))
    pos_score = dict(zip(cand.column("query_id").to_pylist(), cand.column("positive_scores").to_pylist(), strict=True))
    for q, p, nid, ns, rank in zip(
        cols["query_id"],
        cols["positive_id"],
        cols["negative_id"],
        cols["negative_score"],
        cols["negative_rank"],
        strict=True,
    ):
        assert p in positives[q] and nid not in positives[q]
        assert keys[nid] not in {keys[x] for x in positives[q]}  # not a duplicate of a positive either
        assert rules.range_min <= rank < rules.range_max
        ref = min(pos_score[q])
        thr = margin_thresholds(np.array([ref]), rules.relative_margin, rules.absolute_margin)[0]
        assert ns <= thr
        assert rules.max_score is None or ns <= rules.max_score
        assert rules.min_score is None or ns >= rules.min_score
    per_pair: dict[tuple[str, str], list[int]] = {}
    for q, p, rank in zip(cols["query_id"], cols["positive_id"], cols["negative_rank"], strict=True):
        per_pair.setdefault((q, p), []).append(rank)
    assert all(len(v) == len(set(v)) <= rules.num_negatives for v in per_pair.values())
