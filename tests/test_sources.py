import pytest

from shards.canonical import read_canonical
from shards.prepare import prepare
from shards.sources import convert_ml100k, convert_ninerec
from tests.helpers import SHARED_DATA

NINEREC = SHARED_DATA / "ninerec" / "Bili_Food"
POSTERS = SHARED_DATA / "movielens-100k-posters"


@pytest.mark.slow
@pytest.mark.skipif(not NINEREC.exists(), reason=f"{NINEREC} absent (shared datasets not mounted)")
def test_ninerec_food_matches_paper_table3(tmp_path):
    convert_ninerec(NINEREC, tmp_path / "raw")
    # the authors' files are already filtered (users >= 5 items); the paper's counts are the files'
    ds = prepare(read_canonical(tmp_path / "raw"), k=1)
    assert (ds.stats["users"], ds.stats["items"], ds.stats["interactions"]) == (6549, 1579, 39740)
    assert ds.stats["items_with_image"] == 0 and ds.stats.get("items_without_title", 0) == 0
    # the first line of sequential_data.txt is "0 1 2 0 4 3": user 0 in that order
    first = next(u for u in ds.users if u.user_id == "0")
    ids = [ds.items[i].item_id for i in first.train + [first.valid, first.test]]
    assert ids == ["1", "2", "0", "4", "3"]


@pytest.mark.slow
@pytest.mark.skipif(not POSTERS.exists(), reason=f"{POSTERS} absent (shared datasets not mounted)")
def test_ml100k_with_posters(tmp_path):
    convert_ml100k(POSTERS, tmp_path / "raw")
    data = read_canonical(tmp_path / "raw")
    assert len(data.items) == 1682 and len(data.interactions) == 100000
    assert data.warnings["items_without_image"] == 16
    assert data.items["1"].title == "Toy Story (1995)"
    ds = prepare(data, k=5)
    assert ds.stats["users"] == 943 and ds.stats["items_with_image"] > 1300
