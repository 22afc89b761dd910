"""Shard reading, packing, deterministic order, per-process sharding and the exact data position, and
scripts/prepare_data.py. The shuffle across a window of shards has its own file, test_shuffle.py."""
from pathlib import Path

import numpy as np
import pytest

from utils.data.loader import BatchLoader, LoaderSettings
from utils.data.order import DataPosition, StreamSpec, data_state, position_from_state, select_shards
from utils.data.shards import LocalShardSource, pack, read_shard
from utils.errors import DataError

VOCAB = 1000
EOT = 0


def write_rows(path: Path, rows: list[list[int]], width: int, mask_key: str | None = "attention_mask",
               dtype: type = np.int32) -> None:
    """A shard in the original tokenizer's layout: right-padded rows (pad id 7, which must never appear)."""
    ids = np.full((len(rows), width), 7, dtype=dtype)
    mask = np.zeros((len(rows), width), dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    arrays = {"input_ids": ids}
    if mask_key == "attention_mask":
        arrays["attention_mask"] = mask
    elif mask_key == "sequence_lengths":
        arrays["sequence_lengths"] = np.array([len(r) for r in rows])
    np.savez_compressed(path, **arrays)


def make_stream_shards(folder: Path, count: int, tokens_per_shard: int) -> list[np.ndarray]:
    """1-D shards whose tokens are unique across shards, so any sample identifies where it came from."""
    folder.mkdir(parents=True, exist_ok=True)
    streams = []
    for i in range(count):
        stream = (np.arange(tokens_per_shard) + i * tokens_per_shard) % (VOCAB - 1) + 1
        np.savez(folder / f"tokenized_{i:03d}.npz", input_ids=stream.astype(np.int64))
        streams.append(stream)
    return streams


def spec_for(folder: Path, seq_len: int = 8, seed: int = 3, window: int = 2) -> tuple[LocalShardSource, StreamSpec]:
    source = LocalShardSource(folder, "tokenized_*.npz")
    return source, StreamSpec(tuple(source.list_shards()), seq_len, seed, VOCAB, EOT, None, window)


def take(loader: BatchLoader, n: int) -> list:
    batches = [next(loader) for _ in range(n)]
    return batches


# --- reading and packing ---------------------------------------------------------------------------

def test_padded_rows_drop_padding_and_get_end_of_text(tmp_path: Path) -> None:
    write_rows(tmp_path / "s.npz", [[5, 6, 8], [9], [10, 11, 12, 13]], width=6)
    tokens = read_shard(tmp_path / "s.npz", VOCAB, EOT, None)
    assert tokens.tolist() == [5, 6, 8, EOT, 9, EOT, 10, 11, 12, 13, EOT]
    assert 7 not in tokens  # the pad id never reaches training


def test_sequence_lengths_and_no_end_of_text(tmp_path: Path) -> None:
    write_rows(tmp_path / "s.npz", [[5, 6], [9, 10, 11]], width=4, mask_key="sequence_lengths", dtype=np.int16)
    assert read_shard(tmp_path / "s.npz", VOCAB, None, None).tolist() == [5, 6, 9, 10, 11]


def test_rows_without_mask_or_lengths_need_a_pad_id(tmp_path: Path) -> None:
    write_rows(tmp_path / "s.npz", [[5, 7, 8], [9], [10, 11, 12, 13, 14], []], width=5, mask_key=None)
    with pytest.raises(DataError) as error:
        read_shard(tmp_path / "s.npz", VOCAB, EOT, None)
    assert str(error.value) == (f"{tmp_path / 's.npz'}: 2-D input_ids without attention_mask or sequence_lengths; "
                                "set pad_token_id in the config to strip each row's trailing padding")
    # The trailing pad ids go; one inside a row is a token. A row of padding only is no document.
    assert read_shard(tmp_path / "s.npz", VOCAB, EOT, 7).tolist() == [5, 7, 8, EOT, 9, EOT, 10, 11, 12, 13, 14, EOT]


@pytest.mark.parametrize("row, what", [([0, 1, 1, 0], "left padding"), ([1, 0, 1, 0], "a gap")])
def test_attention_mask_that_is_not_right_padding_is_an_error(tmp_path: Path, row: list[int], what: str) -> None:
    path = tmp_path / "tokenized_mask.npz"
    np.savez(path, input_ids=np.array([[5, 6, 7, 7], [5, 6, 8, 9]]), attention_mask=np.array([[1, 1, 0, 0], row]))
    with pytest.raises(DataError) as error:
        read_shard(path, VOCAB, EOT, None)
    assert str(error.value) == (f"{path}: attention_mask row 1 is not a run of ones followed by zeros (left padding "
                                "or a gap); rows must be right-padded")


def test_a_shard_records_its_end_of_text_id_which_must_be_the_models(tmp_path: Path) -> None:
    path = tmp_path / "tokenized_0.npz"
    np.savez(path, input_ids=np.array([5, 6, 3, 8, 3], dtype=np.uint16), eos_token_id=np.array(3))
    assert read_shard(path, VOCAB, 3, None).tolist() == [5, 6, 3, 8, 3]
    for model_eos in (EOT, None):
        with pytest.raises(DataError) as error:
            read_shard(path, VOCAB, model_eos, None)
        assert str(error.value) == (f"{path}: written with end-of-text id 3, but model.eos_token_id is {model_eos}; "
                                    "set model.eos_token_id to the data's")
    # 2-D rows written with their end-of-text ids get no second one.
    np.savez(path, input_ids=np.array([[5, 3, 9], [6, 8, 3]]), sequence_lengths=np.array([2, 3]),
             eos_token_id=np.array([3]))
    assert read_shard(path, VOCAB, 3, None).tolist() == [5, 3, 6, 8, 3]


def test_a_shard_shorter_than_one_sample_is_skipped_and_counted(tmp_path: Path, caplog) -> None:
    make_stream_shards(tmp_path, count=3, tokens_per_shard=16)  # 2 samples of 8 each
    np.savez(tmp_path / "tokenized_001.npz", input_ids=np.arange(1, 8))  # 7 tokens
    source, spec = spec_for(tmp_path, window=3)
    loader = BatchLoader(source, spec, LoaderSettings(2), 0, 1, DataPosition())
    batches = take(loader, 3)
    loader.close()
    assert [b.position.shards_skipped for b in batches] == [1, 1, 2]  # once in each epoch
    assert f"skipping {tmp_path / 'tokenized_001.npz'}: 7 tokens, fewer than one sample of 8" in caplog.text


def test_one_dimensional_stream_is_used_as_is(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", input_ids=np.array([1, 2, 3], dtype=np.uint16))
    tokens = read_shard(tmp_path / "s.npz", VOCAB, EOT, None)
    assert tokens.tolist() == [1, 2, 3] and tokens.dtype == np.int32


def test_pack_cuts_full_samples_and_drops_the_tail() -> None:
    packed = pack(np.arange(23, dtype=np.int32), 5)
    assert packed.shape == (4, 5)
    assert packed[1].tolist() == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p, input_ids=np.array([1, VOCAB])), f"token id {VOCAB} outside"),
    (lambda p: np.savez(p, input_ids=np.array([1, -1])), "token id -1 outside"),
    (lambda p: np.savez(p, tokens=np.array([1, 2])), "no 'input_ids' array (found: tokens)"),
    (lambda p: np.savez(p, input_ids=np.array([1.0, 2.0])), "dtype float64"),
    (lambda p: np.savez(p, input_ids=np.zeros(0, dtype=np.int32)), "holds no tokens"),
    (lambda p: np.savez(p, input_ids=np.zeros((2, 2, 2), dtype=np.int32)), "must be 1-D or 2-D"),
    (lambda p: p.write_bytes(b"this is not a zip file"), "unreadable shard"),
    (lambda p: p.write_bytes(b""), "unreadable shard"),
    (lambda p: np.savez(p, input_ids=np.ones((2, 3), np.int32), attention_mask=np.ones((2, 2), np.int32)),
     "attention_mask shape"),
    (lambda p: np.savez(p, input_ids=np.array([1, 2]), eos_token_id=np.array([0, 1])), "eos_token_id must be one"),
])
def test_bad_shards_give_one_line_errors_naming_the_file(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "tokenized_bad.npz"
    make(path)
    with pytest.raises(DataError) as error:
        read_shard(path, VOCAB, EOT, None)
    assert str(path) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_truncated_shard_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tokenized_0.npz"
    np.savez_compressed(path, input_ids=np.arange(5000, dtype=np.int32) % VOCAB)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="unreadable shard"):
        read_shard(path, VOCAB, EOT, None)


def test_missing_or_empty_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        LocalShardSource(tmp_path / "nope", "tokenized_*.npz").list_shards()
    with pytest.raises(DataError, match="no shards matching"):
        LocalShardSource(tmp_path, "tokenized_*.npz").list_shards()


def test_a_folder_named_like_a_shard_is_left_out_and_said_so(tmp_path: Path) -> None:
    from configs.training_config import config_from_dict
    from utils.data_utils import RunData
    make_stream_shards(tmp_path, 2, 16)
    (tmp_path / "tokenized_zzz.npz").mkdir()  # an unpacked archive, say
    source, spec = spec_for(tmp_path)
    assert spec.shards == ("tokenized_000.npz", "tokenized_001.npz") and source.not_shards == ["tokenized_zzz.npz"]
    config = config_from_dict({"model_preset": "tiny", "data": str(tmp_path)}, "test")
    lines = RunData(config, source, spec, None, None, None, None).describe(tokens_per_step=64)
    assert lines[-1] == f"⚠️  Data: skipped 1 folder(s) named like shards in {tmp_path}/tokenized_*.npz: tokenized_zzz.npz"


# --- order, sharding and position ------------------------------------------------------------------

def test_max_files_is_a_seeded_pick_not_the_first_files() -> None:
    names = [f"tokenized_{i:03d}.npz" for i in range(50)]
    picked = select_shards(names, 5, seed=1)
    assert picked == select_shards(list(reversed(names)), 5, seed=1)  # independent of listing order
    assert len(picked) == 5 and picked != names[:5]
    assert select_shards(names, 5, seed=2) != picked
    assert select_shards(names, -1, seed=1) == names


def test_every_sample_once_per_epoch_and_epochs_reshuffle(tmp_path: Path) -> None:
    streams = make_stream_shards(tmp_path, count=3, tokens_per_shard=40)  # 5 samples of 8 per shard
    source, spec = spec_for(tmp_path)
    loader = BatchLoader(source, spec, LoaderSettings(3), 0, 1, DataPosition())
    batches = take(loader, 10)  # 30 samples = two epochs of 15
    loader.close()
    samples = np.concatenate([b.input_ids.numpy() for b in batches])
    expected = sorted(tuple(row) for s in streams for row in pack(s, 8))
    first, second = samples[:15], samples[15:]
    assert sorted(map(tuple, first)) == expected and sorted(map(tuple, second)) == expected
    assert [tuple(r) for r in first] != [tuple(r) for r in second]
    assert batches[-1].position.epoch == 2 and batches[-1].position.files_consumed(3) == 6
    assert batches[-1].position.samples_consumed == 30


def test_processes_get_disjoint_samples_covering_the_single_process_stream(tmp_path: Path) -> None:
    make_stream_shards(tmp_path, count=4, tokens_per_shard=64)
    source, spec = spec_for(tmp_path)
    single = BatchLoader(source, spec, LoaderSettings(4), 0, 1, DataPosition())
    ranks = [BatchLoader(source, spec, LoaderSettings(2), r, 2, DataPosition()) for r in (0, 1)]
    one = [b.input_ids.numpy() for b in take(single, 6)]
    two = [[b.input_ids.numpy() for b in take(loader, 6)] for loader in ranks]
    for loader in [single, *ranks]:
        loader.close()
    for step in range(6):
        rank0, rank1 = (set(map(tuple, two[r][step])) for r in (0, 1))
        assert not rank0 & rank1
        assert rank0 | rank1 == set(map(tuple, one[step]))  # same global batch, split between processes


def test_resuming_from_a_position_yields_exactly_the_following_batches(tmp_path: Path) -> None:
    make_stream_shards(tmp_path, count=3, tokens_per_shard=56)  # 7 samples per shard: batches cross shards
    source, spec = spec_for(tmp_path)
    straight = BatchLoader(source, spec, LoaderSettings(2), 0, 1, DataPosition())
    reference = take(straight, 20)
    straight.close()
    for cut in (3, 7, 10, 11):  # mid-shard, at shard ends, across the epoch boundary
        state = data_state(spec, reference[cut - 1].position)
        resumed = BatchLoader(source, spec, LoaderSettings(2), 0, 1, position_from_state(spec, state, "test"))
        again = take(resumed, 20 - cut)
        resumed.close()
        assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(again, reference[cut:]))
        assert again[-1].position == reference[-1].position


def test_resume_refuses_a_different_stream(tmp_path: Path) -> None:
    make_stream_shards(tmp_path, count=2, tokens_per_shard=32)
    _, spec = spec_for(tmp_path)
    state = data_state(spec, DataPosition(0, 1, 2, 10))
    with pytest.raises(DataError, match="seq_len"):
        position_from_state(StreamSpec(spec.shards, 16, spec.seed, VOCAB, EOT, None, 2), state, "ckpt")
    with pytest.raises(DataError, match="shard list changed"):
        position_from_state(StreamSpec(spec.shards[:1], 8, spec.seed, VOCAB, EOT, None, 2), state, "ckpt")


def test_bad_shard_stops_the_loader_or_is_skipped_and_counted(tmp_path: Path) -> None:
    make_stream_shards(tmp_path, count=3, tokens_per_shard=40)
    (tmp_path / "tokenized_001.npz").write_bytes(b"garbage")
    source, spec = spec_for(tmp_path)
    strict = BatchLoader(source, spec, LoaderSettings(5), 0, 1, DataPosition())
    with pytest.raises(DataError, match="tokenized_001.npz"):
        take(strict, 3)
    strict.close()
    lenient = BatchLoader(source, spec, LoaderSettings(5, skip_bad_shards=True), 0, 1, DataPosition())
    batches = take(lenient, 4)  # two good shards of 5 samples each per epoch
    lenient.close()
    assert batches[1].position.shards_skipped + batches[1].position.epoch >= 1
    assert batches[-1].position.epoch == 2 and batches[-1].position.shards_skipped == 2


def test_an_epoch_without_a_full_sample_is_an_error(tmp_path: Path) -> None:
    make_stream_shards(tmp_path, count=2, tokens_per_shard=5)  # shorter than seq_len 8
    source, spec = spec_for(tmp_path)
    loader = BatchLoader(source, spec, LoaderSettings(1), 0, 1, DataPosition())
    with pytest.raises(DataError, match="no shard holds a full sample"):
        next(loader)
    loader.close()


# --- scripts/prepare_data.py -------------------------------------------------------------------------

def test_prepare_data_writes_the_tokenizer_beside_the_shards(tmp_path: Path, sample_data: Path, capsys) -> None:
    from configs.training_config import TrainingConfig
    from scripts import prepare_data
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(f'{{"text": "Return the number of items in list {i}."}}' for i in range(30)) + "\n")
    output = tmp_path / "mine"
    assert prepare_data.main(["--input", str(corpus), "--tokenizer", str(sample_data / "tokenizer.json"),
                              "--output", str(output), "--tokens-per-shard", "120"]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    assert sorted(path.name for path in output.iterdir()) == [
        "tokenized_00000.npz", "tokenized_00001.npz", "tokenized_00002.npz", "tokenizer.json"]
    assert (output / "tokenizer.json").read_bytes() == (sample_data / "tokenizer.json").read_bytes()
    # A training run on this folder finds it (and copies it into its checkpoints).
    assert TrainingConfig(data=str(output)).tokenizer_path() == output / "tokenizer.json"
    # Run again in place, with the folder's own copy as --tokenizer: still there, unchanged.
    assert prepare_data.main(["--input", str(corpus), "--tokenizer", str(output / "tokenizer.json"),
                              "--output", str(output)]) == 0
    assert (output / "tokenizer.json").read_bytes() == (sample_data / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("lines, message", [
    (['{"body": "some text"}'], "corpus.jsonl:1: not a JSON object with a 'text' field (its fields: body)"),
    (['{"text": "fine"}', "{not json"], "corpus.jsonl:2: not valid JSON"),
    (['{"text": 42}'], "corpus.jsonl:1: the 'text' field is a int, not a string"),
])
def test_prepare_data_bad_input_is_one_line_with_exit_2(tmp_path: Path, sample_data: Path, capsys,
                                                        lines: list[str], message: str) -> None:
    from scripts import prepare_data
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    code = prepare_data.main(["--input", str(corpus), "--tokenizer", str(sample_data / "tokenizer.json"),
                              "--output", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0]


def test_prepare_data_bad_tokenizer_is_one_line_with_exit_2(tmp_path: Path, capsys) -> None:
    from scripts import prepare_data
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "some text"}\n')
    code = prepare_data.main(["--input", str(corpus), "--tokenizer", str(corpus), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {corpus}: not a tokenizer.json") and len(err.strip().splitlines()) == 1


def document_segments(folder: Path, eos: int) -> list[list[int]]:
    """The token ids between end-of-text ids, over the folder's shards in name order; checks that every shard
    records `eos` and ends with it (no document spans two shards)."""
    segments = []
    for path in sorted(folder.glob("tokenized_*.npz")):
        with np.load(path) as shard:
            assert int(shard["eos_token_id"]) == eos and shard["input_ids"].ndim == 1
        tokens = read_shard(path, 4096, eos, None)
        assert tokens[-1] == eos
        ends = np.flatnonzero(tokens == eos)
        segments += [part.tolist() for part in np.split(tokens, ends + 1)[:-1]]
    return [segment[:-1] for segment in segments]


def test_prepare_data_never_splits_a_document(tmp_path: Path, sample_data: Path, capsys) -> None:
    from tokenizers import Tokenizer

    from scripts import prepare_data
    texts = [("Return the sorted list of keys of the mapping, longest first. " * (1 + i % 4)).strip()
             for i in range(12)]
    texts[5] = "A document that names <|endoftext|> in its text is still one document."
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "{text}"}}\n' for text in texts))
    output = tmp_path / "mine"
    assert prepare_data.main(["--input", str(corpus), "--tokenizer", str(sample_data / "tokenizer.json"),
                              "--output", str(output), "--tokens-per-shard", "60"]) == 0
    assert "end-of-text id 0: model.eos_token_id must be 0" in capsys.readouterr().out
    tokenizer = Tokenizer.from_file(str(sample_data / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    expected = [tokenizer.encode(text).ids for text in texts]
    assert max(map(len, expected)) > 2 * 16  # the old --row-length 16 would have split most of them
    assert document_segments(output, eos=0) == expected  # one end-of-text id per document, at its end
    assert len(list(output.glob("tokenized_*.npz"))) > 2


def test_the_sample_has_one_end_of_text_id_per_document(sample_data: Path) -> None:
    from scripts.prepare_data import SAMPLE_CHARACTERS, stdlib_docstrings
    segments = document_segments(sample_data, eos=0)
    assert len(segments) == len(stdlib_docstrings(SAMPLE_CHARACTERS)) and all(segments)
    assert len(list(sample_data.glob("tokenized_*.npz"))) == 8  # the tiny config trains on 7, validates on 1


def test_prepare_data_needs_an_end_of_text_id(tmp_path: Path, capsys) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from scripts import prepare_data
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "[SEP]": 1, "one": 2, "two": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer_file = tmp_path / "words.json"
    tokenizer.save(str(tokenizer_file))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two two one")
    arguments = ["--input", str(corpus), "--tokenizer", str(tokenizer_file), "--output", str(tmp_path / "out")]
    assert prepare_data.main(arguments) == 2
    error = f"error: {tokenizer_file}: no <|endoftext|> token; pass its end-of-text id with --eos-id\n"
    assert capsys.readouterr().err == error
    assert prepare_data.main([*arguments, "--eos-id", "4"]) == 2
    assert "--eos-id 4 is outside the tokenizer's vocabulary [0, 4)" in capsys.readouterr().err
    assert prepare_data.main([*arguments, "--eos-id", "1"]) == 0
    assert document_segments(tmp_path / "out", eos=1) == [[2, 3, 3, 2]]
