"""Stage ``balance``: whole-word matching, MetaCLIP's keep probability, determinism, stats, re-balancing."""
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clip_curate.fields import ConfigError
from clip_curate.run import run
from clip_curate.stages.balance import (Balance, BalanceConfig, EntryMatcher, _check, decide, draw, entries_from_wordnet,
                                        keep_probabilities, main as entries_main, parse_entries)


def test_matching_is_whole_word_and_multi_word():
    m = EntryMatcher(["dog", "red car", "car", "hot dog"])
    assert m.match("A hotdog stand") == []                      # dog is not inside hotdog
    assert m.match("my Dog, and a red car.") == ["dog", "red car", "car"]
    assert m.match("a red  bus and a car") == ["car"]           # red car only as the two words together
    assert m.match("red cars") == []                            # whole words: cars is not car
    assert m.match("Hot dog!") == ["dog", "hot dog"]
    assert m.match(None) == [] and m.match("") == []


def test_entry_files_lines_comments_and_metaclip_json(tmp_path):
    assert parse_entries("dog\n# comment\n  red car  \n\ndog\ncat # trailing\n") == ("dog", "red car", "cat")
    assert parse_entries('["dog", "red car"]') == ("dog", "red car")
    with pytest.raises(ConfigError, match="no entries"):
        parse_entries("# only a comment\n\n")
    with pytest.raises(ConfigError, match="JSON list must hold strings"):
        parse_entries('["dog", 3]')
    with pytest.raises(ConfigError, match="--balance-entries: cannot read"):
        _check(BalanceConfig(balance_entries=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match="needs --balance-entries"):
        Balance(BalanceConfig())
    with pytest.raises(ConfigError, match="--balance-t"):
        BalanceConfig(balance_t=0)


def test_keep_probability_is_one_minus_product():
    counts = {"head": 1000, "mid": 200, "tail": 10}
    probs = keep_probabilities(counts, 100)
    assert probs == {"head": 0.1, "mid": 0.5}                  # tail entries keep p = 1 (left out)
    n = 20_000
    kept_both = sum(decide(f"u{i}", ["head", "mid"], probs, counts, 7, 100)[0] is None for i in range(n))
    expected = 1 - (1 - 0.1) * (1 - 0.5)                        # 0.55
    assert abs(kept_both / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert decide("u1", ["tail", "head"], probs, counts, 7, 100) == (None, "")
    assert decide("u1", [], probs, counts, 7, 100)[0] == "no_entry"
    dropped = next(decide(f"u{i}", ["head"], probs, counts, 7, 100) for i in range(100)
                   if decide(f"u{i}", ["head"], probs, counts, 7, 100)[0])
    assert dropped == ("over_represented", "entry='head' matched 1000 rows > t=100")
    assert draw("u1", "head", 7) == draw("u1", "head", 7) != draw("u1", "head", 8)


def _rows():
    """A long-tailed caption list: 'dog' in 600 rows, 'cat' in 150, 'owl' in 20, 30 rows with no entry."""
    rows = []
    for i in range(600):
        rows.append({"uid": f"d{i:04d}", "caption": f"a photo of a dog number {i}"})
    for i in range(150):
        rows.append({"uid": f"c{i:04d}", "caption": f"my cat, picture {i}"})
    for i in range(20):
        rows.append({"uid": f"o{i:04d}", "caption": f"an owl at night {i}"})
    for i in range(30):
        rows.append({"uid": f"n{i:04d}", "caption": f"hotdogs and catalogues {i}"})
    return rows


def _balance(run_transform, tmp_path, options=(), t=100, seed=0):
    tmp_path.mkdir(parents=True, exist_ok=True)
    entries = tmp_path / "entries.txt"
    entries.write_text("dog\ncat\nowl\nunused entry\n")
    cfg = BalanceConfig(balance_entries=str(entries), balance_t=t, seed=seed)
    ran = run_transform(_rows(), Balance(cfg, stats_dir=str(tmp_path)), options=options)
    return ran.kept, ran.rejected


def test_head_entries_are_capped_near_t_and_tail_entries_kept(run_transform, tmp_path):
    kept, rejected = _balance(run_transform, tmp_path)
    assert len(kept) + len(rejected) == 800
    by = {k: sum(1 for r in kept if r["uid"].startswith(k)) for k in "dcon"}
    # dog: 600 rows at p = 1/6 -> binomial mean 100, sd ~9.1; cat: 150 at p = 2/3 -> mean 100, sd ~5.8
    assert abs(by["d"] - 100) <= 4 * math.sqrt(600 * (1 / 6) * (5 / 6)), by
    assert abs(by["c"] - 100) <= 4 * math.sqrt(150 * (2 / 3) * (1 / 3)), by
    assert by["o"] == 20 and by["n"] == 0                       # the tail is all kept; no entry -> rejected
    reasons = {(r["stage"], r["reason"]) for r in rejected}
    assert reasons == {("balance", "no_entry"), ("balance", "over_represented")}
    assert sum(r["reason"] == "no_entry" for r in rejected) == 30
    assert all(r["balance_entries"] == ["dog"] for r in kept if r["uid"].startswith("d"))
    over = [r for r in rejected if r["reason"] == "over_represented"]
    assert {r["detail"] for r in over if r["uid"].startswith("d")} == {"entry='dog' matched 600 rows > t=100"}
    summary = json.loads((tmp_path / "_stage_stats" / "balance.json").read_text())
    assert summary["entries_matched"] == 3 and summary["entries_at_or_under_t"] == 1   # owl (20 <= 100)
    top = {e["entry"]: e for e in summary["top_entries"]}
    assert top["dog"]["before"] == 600 and top["dog"]["after"] == by["d"] and top["owl"]["after"] == 20


def test_the_draw_is_the_same_across_runs_and_worker_counts(run_transform, tmp_path):
    one, _ = _balance(run_transform, tmp_path / "a")
    two, _ = _balance(run_transform, tmp_path / "b", ["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    assert sorted(r["uid"] for r in one) == sorted(r["uid"] for r in two)
    other_seed, _ = _balance(run_transform, tmp_path / "c", seed=1)
    assert sorted(r["uid"] for r in one) != sorted(r["uid"] for r in other_seed)


def _jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.slow
def test_rebalance_a_curated_output_without_downloading_again(tmp_path):
    rows = _rows()[::4]  # 150 dog, 38 cat, 5 owl, 7 none
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(pa.table({"jpg": [_jpeg(i) for i in range(len(rows))], "caption": [r["caption"] for r in rows],
                             "url": [f"http://img.test/{r['uid']}.jpg" for r in rows],
                             "status": ["success"] * len(rows)}), pool / "00000.parquet")
    entries = tmp_path / "entries.txt"
    entries.write_text("dog\ncat\nowl\n")
    first = run(["--input", str(pool), "--output", str(tmp_path / "o1"), "--stages", "image", "--clip-model", "none",
                 "--progress-seconds", "0"])
    assert first["curated_rows"] == len(rows)
    second = run(["--input", str(tmp_path / "o1"), "--input-format", "curated", "--output", str(tmp_path / "o2"),
                  "--stages", "balance", "--balance-entries", str(entries), "--balance-t", "20",
                  "--progress-seconds", "0"])
    assert second["input_rows"] == len(rows) == second["curated_rows"] + second["rejected_rows"]
    assert second["rejected_by"]["balance"]["no_entry"] == 7
    assert second["balance"]["t"] == 20 and second["balance"]["entries_at_or_under_t"] == 1
    top = {e["entry"]: e for e in second["balance"]["top_entries"]}
    assert top["dog"]["before"] == 150 and top["owl"]["after"] == 5 and 5 <= top["dog"]["after"] <= 40
    cur = pq.read_table(tmp_path / "o2" / "curated").to_pylist()
    assert all(r["balance_entries"] for r in cur) and all(r["image"] for r in cur)
    assert second.get("counters", {}).get("download_bytes", 0) == 0


def test_chunked_runs_refuse_balancing_with_the_way_round(tmp_path):
    import dataclasses

    from clip_curate.config import CurateConfig, plan_passes
    from clip_curate.readers.base import ReaderConfig
    from clip_curate.writers import OutputConfig

    entries = tmp_path / "e.txt"
    entries.write_text("dog\n")
    cfg = CurateConfig(ReaderConfig(input="x.csv"), OutputConfig(output=str(tmp_path / "o")))
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, chunk_rows=10),
                              stages=dataclasses.replace(cfg.stages, balance=BalanceConfig(balance_entries=str(entries))))
    with pytest.raises(ConfigError, match="--input-format curated --stages balance"):
        plan_passes(cfg, 100)
    no_balance = dataclasses.replace(cfg, stages=dataclasses.replace(cfg.stages, balance=BalanceConfig()))
    assert plan_passes(no_balance, 100) == 10


def test_entries_build_from_a_wordnet_index(tmp_path, capsys):
    index = tmp_path / "index.noun"
    index.write_text("  1 This software and database is being provided to you, the LICENSEE, by\n"
                     "dog n 7 5 @ ~ #m #p %p 7 1 02086723 10133978\n"
                     "hot_dog n 2 3 @ ~ + 2 0 07697537 10187990\n"
                     "run v 1 1 @ 1 0 01926311\n")
    out = tmp_path / "entries.txt"
    assert entries_main(["build", "--wordnet", str(index), "--output", str(out)]) == 0
    assert parse_entries(out.read_text()) == ("dog", "hot dog")
    assert entries_from_wordnet(str(index), min_senses=3) == ["dog"]
    with pytest.raises(ConfigError, match="wordnet-base"):
        entries_main(["build", "--wordnet", str(tmp_path / "none"), "--output", str(out)])
