"""Streaming shards from GCS (fake-gcs-server) through the local cache: prefetch, eviction, shared cache,
bad shards, a server restart mid-run, resume while streaming, and a 2-process run."""
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import GCSEmulator, free_port, gcs_server  # noqa: F401  (fixture)

from configs.command_line import config_from_args, parse_args
from configs.training_config import ConfigError, config_from_dict
from conftest import read_metrics, run_train, write_config
from utils.data.cache import CachedShardSource, cache_folder
from utils.data.loader import BatchLoader, LoaderSettings
from utils.data.order import DataPosition, StreamSpec, epoch_shard_order, select_shards, window_starts
from utils.data.shards import LocalShardSource
from utils.data_utils import choose_mixing
from utils.errors import DataError, ShardUnavailableError
from utils.storage import open_storage

SEQ_LEN = 64  # MICRO_MODEL's
PATTERN = "tokenized_*.npz"


def make_shards(folder: Path, count: int, samples: int) -> list[Path]:
    """Tiny 1-D shards of `samples` samples each (plus a few tokens that fill none)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(count):
        path = folder / f"tokenized_{i:05d}.npz"
        np.savez(path, input_ids=rng.integers(0, 4000, size=samples * SEQ_LEN + 5, dtype=np.int32))
        paths.append(path)
    return paths


def upload(server: GCSEmulator, bucket: str, prefix: str, paths: list[Path]) -> None:
    server.create_bucket(bucket)
    for path in paths:
        server.put(bucket, f"{prefix}/{path.name}" if prefix else path.name, path.read_bytes())
    server.put(bucket, f"{prefix}/README.txt" if prefix else "README.txt", b"not a shard")


def downloads(server: GCSEmulator, since: int = 0) -> list[str]:
    """Object names of the media downloads the server has answered (from request number `since` on)."""
    lines = server.requests()[since:]
    return [line.split("/o/")[1].split("?")[0].replace("%2F", "/") for line in lines if "alt=media" in line]


def wait_for(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def source_for(tmp_path: Path, url: str, max_bytes: int = 10**9, cache: str = "cache") -> CachedShardSource:
    storage = open_storage(url)
    return CachedShardSource(storage, PATTERN, cache_folder(tmp_path / cache, storage.url), max_bytes)


def test_listing_prefetch_and_eviction(gcs_server: GCSEmulator, tmp_path: Path) -> None:
    paths = make_shards(tmp_path / "shards", count=6, samples=3)
    upload(gcs_server, "bucket", "data", paths)
    size = max(p.stat().st_size for p in paths)
    source = source_for(tmp_path, "gs://bucket/data", max_bytes=int(2.5 * size))
    names = source.list_shards()
    assert names == [p.name for p in paths]  # the pattern leaves README.txt out
    assert source.folder == tmp_path / "cache" / "bucket" / "data"

    # Left by a crash: a half-written download, and a truncated file under a final name.
    source.folder.mkdir(parents=True, exist_ok=True)
    (source.folder / f"{names[0]}.tmp").write_bytes(paths[0].read_bytes()[:100])
    (source.folder / names[1]).write_bytes(paths[1].read_bytes()[:100])
    source.prefetch(names[:2])
    wait_for(lambda: all((source.folder / n).exists() and (source.folder / n).stat().st_size > 100
                         for n in names[:2]), "the prefetcher")
    assert (source.folder / names[0]).read_bytes() == paths[0].read_bytes()
    assert source.fetch(names[0]) == source.folder / names[0]
    assert sorted(source.downloaded) == names[:2]  # fetch found it cached

    for k, name in enumerate(names):
        source.prefetch(names[k + 1: k + 3])
        assert source.fetch(name).read_bytes() == paths[k].read_bytes()
        source.release(name)
        cached = [p.name for p in source.folder.glob(PATTERN)]
        assert sum((source.folder / n).stat().st_size for n in cached) <= source.max_bytes
    source.close()
    assert sorted(source.downloaded) == names  # each exactly once
    assert len(list(source.folder.glob(PATTERN))) <= 2  # consumed shards were evicted
    assert not list(source.folder.glob("*.tmp"))


def test_a_shard_in_use_elsewhere_is_never_evicted_and_is_downloaded_once(gcs_server: GCSEmulator,
                                                                         tmp_path: Path) -> None:
    paths = make_shards(tmp_path / "shards", count=3, samples=3)
    upload(gcs_server, "bucket", "", paths)
    # Two sources on one cache folder stand for two processes of one machine.
    first = source_for(tmp_path, "gs://bucket", max_bytes=1)
    second = source_for(tmp_path, "gs://bucket", max_bytes=1)
    names = first.list_shards()
    second.list_shards()

    results: list[Path] = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.fetch(names[0]))) for s in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1]
    assert first.downloaded + second.downloaded == [names[0]]

    second.release(names[0])  # over the limit, but `first` still reads it
    assert results[0].exists()
    first.release(names[0])
    assert not results[0].exists()
    first.close()
    second.close()


def test_bad_shards_follow_the_skip_policy_but_unfetchable_ones_always_stop(gcs_server: GCSEmulator,
                                                                           tmp_path: Path) -> None:
    paths = make_shards(tmp_path / "shards", count=4, samples=2)
    (tmp_path / "shards" / "tokenized_00001.npz").write_bytes(b"PK\x03\x04 truncated")
    upload(gcs_server, "bucket", "", paths)
    source = source_for(tmp_path, "gs://bucket")
    shards = tuple(source.list_shards())
    spec = StreamSpec(shards, SEQ_LEN, 1234, 4096, None, None, 16)  # one window of the 4 shards

    # A shard whose content is bad is skipped under skip_bad_shards...
    loader = BatchLoader(source, spec, LoaderSettings(2, skip_bad_shards=True), 0, 1, DataPosition())
    batches = [next(loader) for _ in range(4)]  # one batch per good shard: the fourth is in epoch 1
    loader.close()
    assert batches[3].position.epoch == 1 and 1 <= batches[3].position.shards_skipped <= 2  # once per epoch

    loader = BatchLoader(source, spec, LoaderSettings(2, skip_bad_shards=False), 0, 1, DataPosition())
    with pytest.raises(DataError, match=r"tokenized_00001\.npz: unreadable"):
        for _ in range(4):
            next(loader)
    loader.close()

    # ...but one that cannot be fetched is not the data's fault (here gone after the listing; a network
    # outage or a full local disk alike): skipping it would silently drop data, so training stops.
    (tmp_path / "second").mkdir()
    uncached = source_for(tmp_path / "second", "gs://bucket")
    assert tuple(uncached.list_shards()) == shards
    open_storage("gs://bucket").delete("tokenized_00002.npz")
    loader = BatchLoader(uncached, spec, LoaderSettings(2, skip_bad_shards=True), 0, 1, DataPosition())
    with pytest.raises(ShardUnavailableError, match=r"tokenized_00002\.npz: not found"):
        for _ in range(4):
            batch = next(loader)
            assert batch.position.shards_skipped <= 1  # only the truncated shard was skipped
    loader.close()
    uncached.close()
    source.close()


def test_streamed_batches_equal_local_ones_across_a_server_restart(gcs_server: GCSEmulator, tmp_path: Path) -> None:
    paths = make_shards(tmp_path / "shards", count=5, samples=4)
    upload(gcs_server, "bucket", "data", paths)
    size = max(p.stat().st_size for p in paths)
    # A cache of 2 shards, smaller than the window of 4: the second epoch must download evicted shards again.
    source = source_for(tmp_path, "gs://bucket/data", max_bytes=2 * size)
    shards = tuple(select_shards(source.list_shards(), 4, 1234))
    spec = StreamSpec(shards, SEQ_LEN, 1234, 4096, None, None, 16)
    local = BatchLoader(LocalShardSource(tmp_path / "shards", PATTERN), spec, LoaderSettings(2), 0, 1,
                        DataPosition())
    # Reading at most 3 batches ahead, the loader is still in epoch 0 when the server stops.
    streamed = BatchLoader(source, spec, LoaderSettings(2, prefetch_shards=1, prefetch_batches=2), 0, 1,
                           DataPosition())
    expected = [next(local) for _ in range(16)]  # two epochs of 4 shards x 2 batches
    local.close()

    got = [next(streamed) for _ in range(3)]
    before_stop = len(gcs_server.requests())
    gcs_server.stop()
    restarted = threading.Timer(1.5, gcs_server.start)
    restarted.start()
    got += [next(streamed) for _ in range(13)]
    restarted.join()
    streamed.close()
    source.close()

    for mine, theirs in zip(got, expected, strict=True):
        assert torch_equal(mine.input_ids, theirs.input_ids)
        assert mine.position == theirs.position
    # A cache that holds two of the four shards: the second epoch downloads evicted shards again.
    assert set(source.downloaded) == set(shards) and len(source.downloaded) > len(shards)
    assert downloads(gcs_server, since=before_stop)  # some waited for the restarted server


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_resume_while_streaming_continues_at_the_same_sample(gcs_server: GCSEmulator, tmp_path: Path) -> None:
    paths = make_shards(tmp_path / "shards", count=8, samples=4)
    upload(gcs_server, "refocused-ai", "", paths)
    # 28 samples an epoch in windows of 1, 2, 2 and 2 shards; 8 steps of 2 plus a read-ahead of 2 batches stay
    # inside epoch 0, and step 4 is in the middle of the second window.
    common = {"max_files": 7, "lr_decay_steps": 8, "prefetch_shards": 2, "prefetch_batches": 2, "save_steps": 4,
              "shuffle_window_shards": 2, "mix_whole_dataset": False}  # windows of whole shards: see the downloads

    local_run = tmp_path / "local"
    local_run.mkdir()
    result = run_train("--config", str(write_config(local_run, tmp_path / "shards", **common)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Tokenizer: none (no tokenizer field, no tokenizer.json beside the shards)") == 1

    tokenizer = b'{"a tokenizer": "beside the shards in the bucket"}'
    gcs_server.put("refocused-ai", "tokenizer.json", tokenizer)
    run = tmp_path / "streamed"
    run.mkdir()
    config = write_config(run, "gs://refocused-ai", cache_dir=str(run / "cache1"), **common)
    result = run_train("--config", str(config), "--max-steps", "4", env=gcs_server.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gs://refocused-ai/tokenized_*.npz via emulator at" in result.stderr
    assert f"Tokenizer: {run / 'cache1' / 'refocused-ai' / 'tokenizer.json'}, copied into every checkpoint" in result.stderr
    assert all((checkpoint / "tokenizer.json").read_bytes() == tokenizer
               for checkpoint in (run / "checkpoints").glob("checkpoint-*"))
    first_downloads = len(gcs_server.requests())

    # A fresh cache, as on a new machine after a preemption.
    config = write_config(run, "gs://refocused-ai", cache_dir=str(run / "cache2"), **common)
    result = run_train("--config", str(config), "--resume", "latest", env=gcs_server.env)
    assert result.returncode == 0, result.stderr[-3000:]

    expected = [line["loss"] for line in read_metrics(local_run / "logs")]
    assert [line["loss"] for line in read_metrics(run / "logs")] == expected  # steps 1-4, then 5-8 resumed
    [checkpoint] = (run / "checkpoints").glob("checkpoint-*-step4-*")
    state = json.loads((checkpoint / "data_state.json").read_text())
    order = [state["shards"][i] for i in epoch_shard_order(len(state["shards"]), 1234, 0)]
    cursor = state["position"]["shard_cursor"]
    assert (cursor, state["position"]["sample_cursor"]) == (1, 4)
    starts = window_starts(len(order), 2)
    resumed = set(downloads(gcs_server, since=first_downloads))
    assert set(order[cursor: starts[starts.index(cursor) + 1]]) <= resumed  # the window being read, again
    assert not resumed & set(order[:cursor])  # nothing already consumed is downloaded again


def test_the_next_window_is_downloaded_while_this_one_trains(gcs_server: GCSEmulator, tmp_path: Path) -> None:
    paths = make_shards(tmp_path / "shards", count=6, samples=4)
    upload(gcs_server, "bucket", "", paths)
    source = source_for(tmp_path, "gs://bucket")
    spec = StreamSpec(tuple(source.list_shards()), SEQ_LEN, 1234, 4096, None, None, 2)  # 3 windows of 2 shards
    order = [spec.shards[i] for i in epoch_shard_order(6, 1234, 0)]
    # A window holds 4 batches of 2 and the loader reads at most 2 ahead: it stays in window 0 meanwhile.
    loader = BatchLoader(source, spec, LoaderSettings(2, prefetch_batches=1, prefetch_shards=1), 0, 1,
                         DataPosition())
    next(loader)
    # A cache file exists only once its download is complete and verified.
    wait_for(lambda: all((source.folder / name).exists() for name in order[2:4]), "the next window's shards")
    time.sleep(0.2)
    assert sorted(source.downloaded) == sorted(order[:4])  # the whole next window, not only prefetch_shards 1
    loader.close()
    source.close()


def test_missing_bucket_is_a_one_line_error_before_training(gcs_server: GCSEmulator, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run_train("--config", str(write_config(tmp_path, "gs://no-such-bucket/data", cache_dir=str(cache))),
                       env=gcs_server.env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: gs://no-such-bucket: bucket does not exist"
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*"))  # the folder is made (and checked) at start
    assert "Model:" not in result.stderr  # refused before training
    assert not cache.exists()  # no cache folder for a bucket that does not exist (it appears with a first fetch)


def test_two_processes_download_each_shard_once(gcs_server: GCSEmulator, tmp_path: Path) -> None:
    paths = make_shards(tmp_path / "shards", count=6, samples=3)
    upload(gcs_server, "bucket", "", paths)
    config = write_config(tmp_path, "gs://bucket", cache_dir=str(tmp_path / "cache"), max_steps=4, save_steps=4)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = run_train("--config", str(config), launcher=launcher, env=gcs_server.env)
    assert result.returncode == 0, result.stderr[-3000:]
    fetched = downloads(gcs_server)
    # 4 steps x 2 processes x 2 samples = 16 samples: all 6 shards, each downloaded once for both processes
    assert sorted(fetched) == [p.name for p in paths]
    assert [line["step"] for line in read_metrics(tmp_path / "logs")] == [1, 2, 3, 4]


def test_config_fields_for_streaming() -> None:
    config = config_from_dict({"data": "gs://refocused-ai", "cache_max_gb": 0.5}, "test")
    assert (config.cache_dir, config.prefetch_shards, config.gcs_credentials) == ("cache", 4, None)
    for bad, message in [({"data": "gs://"}, "names no bucket"), ({"cache_max_gb": 0}, "cache_max_gb"),
                         ({"prefetch_shards": -1}, "prefetch_shards"), ({"cache_dir": ""}, "cache_dir")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(bad, "test")
    args = parse_args(["--data", "gs://bucket/prefix", "--gcs-credentials", "key.json"])
    config = config_from_args(args)
    assert config.data == "gs://bucket/prefix"  # not made a local path
    assert config.gcs_credentials == str(Path("key.json").absolute())  # a flag's path: from the current folder
    assert Path(config.cache_dir).is_absolute()


def test_windows_mix_the_whole_dataset_unless_the_cache_cannot_hold_it(gcs_server: GCSEmulator,
                                                                         tmp_path: Path) -> None:
    paths = make_shards(tmp_path / "shards", count=6, samples=4)
    upload(gcs_server, "bucket", "", paths)
    total = sum(path.stat().st_size for path in paths)
    config = config_from_dict({"data": "gs://bucket", "shuffle_window_shards": 2}, "test")
    fits = source_for(tmp_path, "gs://bucket", max_bytes=total)
    shards = fits.list_shards()
    mix, note = choose_mixing(config, fits, shards, resumed=None)
    assert mix and note == ("Order: 3 windows an epoch, each a seeded 1/3 of every one of the 6 shards "
                            "(mix_whole_dataset): each shard is read 3 times an epoch")
    small = source_for(tmp_path, "gs://bucket", max_bytes=total - 1, cache="small")
    small.list_shards()
    mix, note = choose_mixing(config, small, shards, resumed=None)
    assert not mix and note.startswith(f"Order: 3 windows of whole shards an epoch (mix_whole_dataset false: the 6 "
                                       f"shards ({total / 1000:,.1f} KB) do not fit cache_max_gb 20, and every "
                                       "window would download them again)")
    # A resume keeps the order its checkpoint began with, whatever the cache holds now; a choice is a choice.
    assert choose_mixing(config, small, shards, resumed={"mix_whole_dataset": True})[0]
    assert not choose_mixing(config, fits, shards, resumed={})[0]  # saved before the choice: whole shards
    forced = config_from_dict({"data": "gs://bucket", "shuffle_window_shards": 2, "mix_whole_dataset": True}, "test")
    mix, note = choose_mixing(forced, small, shards, resumed=None)
    assert mix and note.endswith("; ⚠️  the 6 shards ({:,.1f} KB) do not fit cache_max_gb 20: every window downloads "
                                 "them again".format(total / 1000))
    for source in (fits, small):
        source.close()
