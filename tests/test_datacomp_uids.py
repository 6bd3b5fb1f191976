"""DataComp uid export: the sorted (u8, u8) array the resharder reads, and its exact round trip."""
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_curate.datacomp import UID_DTYPE, array_to_uids, curated_uids, uids_to_array, write_uids
from clip_curate.fields import ConfigError
from clip_curate.records import make_uid


def test_round_trip_is_exact_and_sorted(tmp_path):
    uids = [hashlib.md5(str(i).encode()).hexdigest() for i in range(500)] + [make_uid("http://a/1.jpg", "c")]
    arr = uids_to_array(uids + uids[:10])                     # duplicates once
    assert arr.dtype == UID_DTYPE and len(arr) == len(set(uids))
    assert np.all(np.diff(arr["u0"].astype(object)) >= 0)
    assert sorted(array_to_uids(arr)) == sorted(set(uids))
    assert array_to_uids(arr) == sorted(set(uids))             # hex order == numeric (u0, u1) order
    # DataComp's own construction of the pair from a uid string
    u = uids[0]
    assert tuple(uids_to_array([u])[0]) == (int(u[:16], 16), int(u[16:], 16))
    path = tmp_path / "uids.npy"
    assert write_uids(uids, str(path)) == len(set(uids))
    assert array_to_uids(np.load(path)) == sorted(set(uids))


def test_curated_shards_give_back_the_inputs_own_uids(tmp_path):
    own = ["0" * 31 + "1", "f" * 32, "0123456789abcdef0123456789ABCDEF"]
    (tmp_path / "out" / "curated").mkdir(parents=True)
    pq.write_table(pa.table({"uid": own, "caption": ["a", "b", "c"]}), tmp_path / "out" / "curated" / "part-0.parquet")
    got = array_to_uids(uids_to_array(curated_uids(str(tmp_path / "out"))))
    assert got == sorted(u.lower() for u in own)


@pytest.mark.parametrize("bad", ["abc", "g" * 32, "1" * 33])
def test_uids_that_are_not_32_hex_digits_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="not 32 hex digits"):
        uids_to_array([bad])


def test_no_shards_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no curated Parquet shards"):
        curated_uids(str(tmp_path))


def test_export_command_writes_the_npy_and_refuses_to_overwrite(tmp_path, capsys):
    from clip_curate.cli import main

    own = ["0" * 31 + "2", "a" * 32]
    (tmp_path / "out" / "curated").mkdir(parents=True)
    pq.write_table(pa.table({"uid": own}), tmp_path / "out" / "curated" / "part-0.parquet")
    npy = tmp_path / "uids.npy"
    args = ["export", "--format", "datacomp-uids", "--input", str(tmp_path / "out" / "curated"), "--output", str(npy)]
    assert main(args) == 0
    assert array_to_uids(np.load(npy)) == sorted(own)
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(args[:-1] + [str(tmp_path / "uids.txt")]) == 2
