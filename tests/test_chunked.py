"""``--chunk-rows`` (the input in passes, one Beam job each) and dedup across runs (``--resume``).

A world with exact and near duplicates is served on 127.0.0.1 and curated (caption, download, image,
dedup exact+near) once in one pass and once in 3 passes. Both must account for every input row exactly
once; rows of an earlier pass take part in a later pass's dedup as already-decided rows, so no
duplicate pair survives in the chunked output that the one-pass output drops.
"""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate import cli
from clip_curate.records import uid_hash
from clip_curate.resume import final_shards
from clip_curate.run import run

N_WORLD = 240
STAGE_FLAGS = ["--stages", "caption,download,image,dedup", "--dedup", "exact,near", "--language-candidates", "en,de",
               "--image-size", "64", "--progress-seconds", "0", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def flags(local_net_flags):
    return [*STAGE_FLAGS, *local_net_flags()]


@pytest.fixture(scope="module")
def served(tmp_path_factory, served_world):
    tmp = tmp_path_factory.mktemp("chunked")
    with served_world(tmp, N_WORLD, 41, dup_exact=0.06, dup_near=0.08, broken_404=0.02) as web:
        yield tmp, web.urls, web.table


def _rows(out, sub):
    paths = final_shards(str(out), sub)
    return pa.concat_tables([pq.read_table(p) for p in paths]).to_pylist() if paths else []


def _check_accounted(out, input_uids):
    cur, rej = _rows(out, "curated"), _rows(out, "rejected")
    uids = [r["uid"] for r in cur] + [r["uid"] for r in rej]
    assert sorted(uids) == sorted(input_uids), "every input row exactly once in curated + rejected"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_rows"] == len(input_uids) == stats["curated_rows"] + stats["rejected_rows"]
    assert stats["curated_rows"] == len(cur) and stats["rejected_rows"] == len(rej)
    return cur, rej, stats


def _dup_pairs(table):
    """(copy uid, source uid) of the world's exact and near duplicates."""
    d = table.select(["uid", "truth_kind"]).to_pydict()
    return [(u, k.split(":", 1)[1]) for u, k in zip(d["uid"], d["truth_kind"]) if k.startswith("dup_")]


@pytest.mark.slow
def test_chunked_passes_account_every_row_and_dedup_across_passes(served, flags):
    tmp, urls, table = served
    input_uids = table.column("uid").to_pylist()
    one, three = tmp / "one", tmp / "three"
    run(["--input", str(urls), "--output", str(one), *flags])
    run(["--input", str(urls), "--output", str(three), "--chunk-rows", str(N_WORLD // 3 + 1), "--audit", *flags])
    cur1, rej1, stats1 = _check_accounted(one, input_uids)
    cur3, rej3, stats3 = _check_accounted(three, input_uids)
    assert stats3["passes"] == 3 and "passes" not in stats1
    # --audit with passes: one audit of the whole output after the last pass
    audit = json.loads((three / "audit" / "audit.json").read_text())
    assert audit["populations"]["input"]["rows"] == len(input_uids)
    assert audit["populations"]["curated"]["rows"] == stats3["curated_rows"]
    # every pass wrote its own shards; pass k held exactly the rows whose uid hash is k mod 3
    assert len({p.rsplit("/", 1)[1].split("-")[1] for p in final_shards(str(three), "curated")}) == 3
    assert {uid_hash(u) % 3 for u in input_uids} == {0, 1, 2}

    pairs = _dup_pairs(table)
    assert len(pairs) >= 25
    kept1, kept3 = {r["uid"] for r in cur1}, {r["uid"] for r in cur3}
    both1 = [p for p in pairs if set(p) <= kept1]
    both3 = [p for p in pairs if set(p) <= kept3]
    assert both3 == both1, "a duplicate pair the one-pass run separates is also separated across passes"
    # a row is only ever dropped by a row of its own pass or of an earlier one (earlier passes are final)
    part = {u: uid_hash(u) % 3 for u in input_uids}
    dropped = [r for r in rej3 if r["stage"] == "dedup"]
    droppers = [r["detail"].rsplit(" ", 1)[1] for r in dropped]
    assert all(part[d] <= part[r["uid"]] for r, d in zip(dropped, droppers))
    assert sum(part[d] < part[r["uid"]] for r, d in zip(dropped, droppers)) >= 5, "decided across passes"
    dedup1 = sum(1 for r in rej1 if r["stage"] == "dedup")
    dedup3 = sum(1 for r in rej3 if r["stage"] == "dedup")
    assert dedup1 > 20 and abs(dedup3 - dedup1) <= 2  # equal but for stars of copies ranked differently



@pytest.mark.slow
def test_resume_dedups_against_rows_of_the_earlier_run(served, tmp_path, flags):
    """Run 1 curates half the input; run 2 (--resume, whole input plus re-posted URLs) drops the rows
    that duplicate run 1's curated rows, naming them."""
    _, urls, table = served
    rows = table.select(["url", "caption", "uid"]).to_pylist()
    first = tmp_path / "first.parquet"
    pq.write_table(pa.Table.from_pylist(rows[: len(rows) // 2]), first)
    out = tmp_path / "out"
    run(["--input", str(first), "--output", str(out), *flags])
    kept_first = {r["uid"]: r for r in _rows(out, "curated")}
    assert len(kept_first) > 60
    # the same images again under new uids and captions: exact duplicates (same URL) of run 1's rows
    reposts = [{"url": r["url"], "caption": "posted again", "uid": f"again-{r['uid']}"}
               for r in list(kept_first.values())[:15]]
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.Table.from_pylist(rows + reposts), whole)
    stats = run(["--input", str(whole), "--output", str(out), "--resume", *flags])
    cur, rej, _ = _check_accounted(out, [r["uid"] for r in rows + reposts])
    assert stats["resumed"]["previous_rows"] == len(rows) // 2
    by_uid = {r["uid"]: r for r in rej}
    for r in reposts:
        got = by_uid[r["uid"]]
        assert (got["stage"], got["reason"]) == ("dedup", "duplicate_exact")
        assert got["detail"] == f"duplicate of {r['uid'][len('again-'):]}"
    # run 1's curated rows are final: none of them moved
    assert set(kept_first) <= {r["uid"] for r in cur}


def test_chunk_rows_refuses_settings_that_need_one_job(served, tmp_path, capsys):
    _, urls, _ = served
    base = ["run", "--input", str(urls), "--output", str(tmp_path / "o"), "--allow-private-addresses"]
    assert cli.main([*base, "--chunk-rows", "50", "--clip-model", "synthetic-tiny",
                     "--clip-top-fraction", "0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clip-top-fraction" in err[0] and "--min-clip-score" in err[0]
    assert cli.main([*base, "--chunk-rows", "50", "--dedup", "exact,semantic", "--no-store-embeddings",
                     "--clip-model", "synthetic-tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-store-embeddings" in err[0]
    assert cli.main([*base, "--chunk-rows", "-5"]) == 2
    assert "--chunk-rows must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o" / "curated").exists()


def test_prior_rows_rank_first_and_skip_other_models_embeddings(tmp_path):
    """Earlier rows outrank every new row; an embedding another model made is not compared."""
    from clip_curate.stages.dedup import PRIOR_SCORE, prior_records

    rows = [{"uid": "a", "url": "http://x/a.jpg", "caption": "c", "stage": None, "sha256": "s1", "phash": None,
             "image_embedding": [1.0, 0.0], "embed_model": "m1", "clip_score": 0.1},
            {"uid": "b", "url": "http://x/b.jpg", "caption": "c", "stage": None, "sha256": "s2", "phash": None,
             "image_embedding": [0.0, 1.0], "embed_model": "m2", "clip_score": 0.9}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    pq.write_table(pa.Table.from_pylist([{**rows[0], "uid": "r1", "stage": "dedup"},
                                         {**rows[0], "uid": "r2", "stage": "clip"}]), tmp_path / "r.parquet")
    cur = list(prior_records(("curated", str(tmp_path / "c.parquet")), ("dedup", "safety"), "m1"))
    assert [m["uid"] for m in cur] == ["a", "b"] and all(m["rank"][0] == PRIOR_SCORE for m in cur)
    assert cur[0]["emb"] is not None and cur[1]["emb"] is None and not any(m["dropped"] for m in cur)
    rej = list(prior_records(("rejected", str(tmp_path / "r.parquet")), ("dedup", "safety"), "m1"))
    assert [(m["uid"], m["dropped"]) for m in rej] == [("r1", True)]  # a clip rejection never reached dedup
